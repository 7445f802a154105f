"""Method 'mix' in ``deltatune train``: only λ trains (per adapter / layer / module), the saved λ JSON
and composed PEFT adapter reproduce the trained model's outputs, the input adapters stay untouched."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import deltatune
from deltatune import compose
from deltatune.cli import main

IDS = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))


def _adapters(model_dir: Path, tmp: Path) -> list[Path]:
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    out = []
    for i, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "down_proj"])):
        m = copy.deepcopy(base)
        deltatune.inject(m, deltatune.LoraConfig(r=4, target_modules=targets))
        g = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        out.append(deltatune.save_adapter(m, tmp / f"ad{i}"))
    return out


@pytest.mark.parametrize("granularity,groups", [("adapter", 1), ("layer", 2), ("module", None)])
def test_mix_trains_only_lambda_and_saves_exact_adapter(model_dir: Path, tmp_path: Path, granularity: str,
                                                        groups: int | None) -> None:
    ads = _adapters(model_dir, tmp_path)
    before = [(d / "adapter_model.safetensors").read_bytes() for d in ads]
    out = tmp_path / "run"
    sets = [f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=16", "data.num_eval=2",
            "train.batch_size=4", "train.lr=0.05", f"output_dir={out}", "eval.max_new_tokens=4", "train.bf16=false",
            "train.max_steps=3", "eval.before=false", "method=mix", f"mix.adapters=[{ads[0]},{ads[1]}]",
            f"mix.granularity={granularity}"]
    args = ["train", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    table = json.loads((out / "mix_weights.json").read_text())
    n_groups = len(table["groups"])
    if groups is not None:
        assert n_groups == groups
    else:
        assert n_groups == 2 * 3  # q, v, down in 2 layers (the union of both adapters' modules)
    assert summary["trainable_params"] == 2 * n_groups
    lam = table["weights"]
    assert any(abs(v - 0.5) > 1e-4 for w in lam.values() for v in w.values())  # λ moved from 1/N
    assert [(d / "adapter_model.safetensors").read_bytes() for d in ads] == before

    # the composed adapter ≡ the two adapters weighted by the saved λ (per module group)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    composed = copy.deepcopy(base)
    deltatune.load_adapter(composed, out / "adapter")
    ref = copy.deepcopy(base)
    for name, d in table["adapters"].items():
        deltatune.load_adapter(ref, d, name=name)
    deltatune.set_active(ref, list(table["adapters"]))
    for path, layer in deltatune.lora_layers(ref):
        g = "all" if granularity == "adapter" else path if granularity == "module" else f"layer.{path.split('.')[2]}"
        layer.weights = {n: lam[n][g] for n in layer.adapters}
    with torch.no_grad():
        got, want = composed(IDS).logits, ref(IDS).logits
        assert (want - base(IDS).logits).abs().max() > 1e-4
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(pm(IDS).logits, want, rtol=1e-4, atol=1e-5)


def test_mix_needs_two_adapters(model_dir: Path, tmp_path: Path) -> None:
    ads = _adapters(model_dir, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="at least two"):
        compose.mix.apply_mix(model, compose.mix.MixConfig(adapters=[str(ads[0])]))
