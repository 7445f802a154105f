"""Every (objective × method) pair trains 2 steps through run() on a tiny model and must give: finite
losses; only the method's parameters changed; a save → load round trip with equal outputs; a run
interrupted after step 1 and resumed ≡ the uninterrupted run (same losses, same final outputs).

Objectives join automatically: the matrix runs over registry.OBJECTIVES, each providing its tiny
model and data through ``Objective.tiny_case()`` (deltatune.testing.TinyCase)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune
from deltatune.config import load_config
from deltatune.quant.linear4bit import quantize_base
from deltatune.registry import METHODS, OBJECTIVES, apply_method
from deltatune.testing import TinyCase
from deltatune.train.config import TrainConfig
from deltatune.train.hooks import RunInfo
from deltatune.train.loop import run

# Small settings per method (the matrix checks the plumbing; the method tests check the maths).
# Target modules: "all-linear", which every model family has (Llama's q_proj, BERT's query …).
SMALL: dict[str, list[str]] = {
    "lora": ["lora.r=2"],
    "qlora": ["lora.r=2"],
    "dora": ["lora.r=2"],
    "vera": ["vera.r=4", "vera.target_modules=all-linear"],
    "adalora": ["adalora.init_r=4", "adalora.target_r=2", "adalora.target_modules=all-linear"],
    "full": [], "head": [], "partial": ["partial.top_n_layers=1"],
    "bottleneck": ["bottleneck.r=4"],
    "prompt_tuning": ["prompt.num_virtual_tokens=3"],
    "prefix_tuning": ["prompt.num_virtual_tokens=3", "prompt.projection=true"],  # the MLP, folded when saved
    "p_tuning_v2": ["prompt.num_virtual_tokens=3"],
    "mix": [],  # + mix.adapters: two LoRA adapters made for the case's model (_mix_sources)
}


def _mix_sources(case: TinyCase, tmp_path: Path) -> list[str]:
    """Two non-zero LoRA adapters of the case's base model, for method 'mix' to mix."""
    from deltatune.methods.lora_config import LoraConfig

    paths = []
    for i in range(2):
        m = case.make_model()
        torch.manual_seed(10 + i)
        deltatune.inject(m, LoraConfig(r=2, target_modules="all-linear"))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        paths.append(str(deltatune.save_adapter(m, tmp_path / f"source{i}")))
    return [f"mix.adapters=[{','.join(paths)}]"]


COMMON = ["model.dtype=fp32", "train.max_steps=2", "train.batch_size=2", "train.lr=1e-2", "train.bf16=false",
          "eval.before=false"]

_CASES: dict[str, TinyCase] = {}


def _case(objective: str) -> TinyCase:
    if objective not in _CASES:  # built once per objective for the whole matrix
        _CASES[objective] = OBJECTIVES[objective].tiny_case()
    return _CASES[objective]


@pytest.fixture(autouse=True)
def _no_plot(monkeypatch: pytest.MonkeyPatch) -> None:
    # loss.png costs ~2 s per run on a busy machine; tests/train/test_loop.py checks it.
    monkeypatch.setattr("deltatune.train.plots.plot_losses", lambda *a, **k: None)


def test_every_method_has_matrix_settings() -> None:
    assert set(SMALL) == set(METHODS)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_pair(objective: str, method: str, tmp_path: Path) -> None:
    if (objective, method) == ("classify", "mix"):
        pytest.skip("known gap: the mixed adapter's file does not carry the classifier head yet (classify report)")
    if not getattr(OBJECTIVES[objective], "in_matrix", True):  # e.g. multitask: LoRA family only, own tests
        pytest.skip(f"objective {objective!r} is tested by its own tests, not the method matrix")
    case = _case(objective)
    if method not in case.notes.get("methods", METHODS):  # an objective may train with some methods only
        pytest.skip(f"objective {objective!r} trains with {case.notes['methods']} only")
    small = SMALL[method] + (_mix_sources(case, tmp_path) if method == "mix" else [])

    def cfg(out: Path, *extra: str) -> Any:
        sets = [f"objective={objective}", f"method={method}", *COMMON, *case.overrides, *small,
                f"output_dir={out}", *extra]
        return load_config(TrainConfig, None, sets)

    # The model as the method leaves it before training (run() seeds train.seed before applying).
    ref = case.make_model()
    torch.manual_seed(0)
    apply_method(ref, cfg(tmp_path / "unused"), RunInfo(total_steps=2, steps_per_epoch=2, processor=case.processor))
    OBJECTIVES[objective](cfg(tmp_path / "unused")).after_apply(ref)  # as run() does (classify: its new head)

    model = case.make_model()
    full = run(cfg(tmp_path / "full"), model=model, tokenizer=case.processor, progress=False)
    assert len(full.losses) == 2 and all(math.isfinite(x) for x in full.losses), full.losses

    # Only what the method trains changed (tied names included: a tensor under two keys).
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    now, before = model.state_dict(), ref.state_dict()
    assert now.keys() == before.keys()
    changed = {k for k in now if not torch.equal(now[k], before[k])}
    assert changed, "training changed nothing"
    assert changed <= trained, f"changed outside the method's parameters: {sorted(changed - trained)[:5]}"

    # Save → load on a fresh base gives the trained model's outputs.
    model.eval()
    if METHODS[method].saves == "adapter":
        base = case.make_model()
        quant = cfg(tmp_path / "unused").model.quantize
        quant = quant if quant != "none" else METHODS[method].base_quant
        if quant != "none":
            quantize_base(base, quant)
        loaded = deltatune.load_adapter(base, full.output_dir / "adapter")
    else:
        loaded = case.load_saved(full.output_dir / "model")
    loaded.eval()
    torch.testing.assert_close(case.outputs(loaded), case.outputs(model), rtol=1e-5, atol=1e-5)

    # Interrupted after step 1, resumed with a fresh model: the same losses and the same result.
    part = tmp_path / "part"
    assert run(cfg(part), model=case.make_model(), tokenizer=case.processor, progress=False,
               stop_after_steps=1).interrupted
    resumed_model = case.make_model()
    resumed = run(cfg(part, "resume=true"), model=resumed_model, tokenizer=case.processor, progress=False)
    assert _losses(part) == _losses(full.output_dir) and resumed.losses == full.losses[1:]
    resumed_model.eval()
    torch.testing.assert_close(case.outputs(resumed_model), case.outputs(model), rtol=0, atol=0)
