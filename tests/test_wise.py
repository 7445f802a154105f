"""WiSE-FT: scaled adapters and interpolated full fine-tuning against naive formulas; the sweep table."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune.testing import build_tiny_tokenizer, make_tiny_gpt2, make_tiny_llama
from deltatune.train.reference import text_rows
from deltatune.wise import format_sweep, interpolate, interpolated, merge_scaled, scaled, sweep


def _force_b(model):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            b = layer.factors("default")[1]
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def _naive_scaled(base, model, alpha):
    """W₀ + α·s·B@A written out on a copy of the base."""
    out = copy.deepcopy(base)
    named = dict(out.named_parameters())
    with torch.no_grad():
        for path, layer in deltatune.lora_layers(model):
            a, b = layer.factors("default")
            dw = layer.adapters["default"].scale * (b @ a)
            w = named[f"{path}.weight"]
            w.add_(alpha * (dw.T if layer.kind == "conv1d" else dw))
    return out


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])
def test_scaled_adapter_equals_naive_and_restores_exactly(factory):
    base = factory().eval()
    model = copy.deepcopy(base)
    deltatune.inject(model, deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _force_b(model)
    ids = torch.randint(0, 100, (2, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for alpha in (0.0, 0.5, 1.0):
        with scaled(model, alpha):
            got = model(input_ids=ids).logits
        ref = _naive_scaled(base, model, alpha)(input_ids=ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(input_ids=ids).logits, _naive_scaled(base, model, 1.0)(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)  # adapters active again
    plain = merge_scaled(copy.deepcopy(model), 0.25)
    assert not list(deltatune.lora_layers(plain))
    torch.testing.assert_close(plain(input_ids=ids).logits, _naive_scaled(base, model, 0.25)(input_ids=ids).logits,
                               rtol=1e-5, atol=1e-5)


def test_interpolate_full_finetuning_with_tied_weights():
    base = make_tiny_llama(tie_word_embeddings=True)
    assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p))
    theta = {k: v.clone() for k, v in tuned.state_dict().items()}
    b = base.state_dict()
    with interpolated(tuned, b, 0.3):
        for k, v in tuned.state_dict().items():
            torch.testing.assert_close(v, b[k] + 0.3 * (theta[k] - b[k]))  # tied: moved once, not twice
    assert all(torch.equal(theta[k], v) for k, v in tuned.state_dict().items())
    interpolate(tuned, b, 0.0)
    assert all(torch.allclose(b[k], v) for k, v in tuned.state_dict().items())


def test_sweep_table_endpoints():
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    deltatune.inject(model, deltatune.LoraConfig(r=4, target_modules="all-linear"))
    _force_b(model)
    rows = text_rows(["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"], tok, 100, 16)
    table = sweep(model, [0.0, 0.5, 1.0], lambda m: {"score": 1.0}, rows, tok.pad_token_id, top_k=len(tok))
    assert table[0]["kl_base_to_adapted_mean"] == pytest.approx(0.0, abs=1e-6)
    assert table[0]["reference_loss_increase"] == pytest.approx(0.0, abs=1e-6)
    assert table[2]["kl_base_to_adapted_mean"] > table[1]["kl_base_to_adapted_mean"] > 0
    from deltatune.train.forgetting import adapter_measure

    exact = adapter_measure(model, rows, tok.pad_token_id)  # α = 1 is the adapted model
    assert table[2]["kl_base_to_adapted_mean"] == pytest.approx(exact["kl_mean"], rel=1e-4)
    lines = format_sweep(table)
    assert lines[0].startswith("| alpha | score") and len(lines) == 5


def test_cli_merge_scale_and_sweep(model_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    ref = tmp_path / "ref.txt"
    ref.write_text("The quick brown fox jumps over the lazy dog.\n\nWhat is the capital of France?")
    run_dir = tmp_path / "run"
    common = ["--set", f"model.spec={model_dir}", "--set", "model.dtype=fp32", "--set", "train.bf16=false",
              "--set", f"forgetting.reference_file={ref}", "--set", "eval.exact_match=false"]
    assert main(["train", "--no-progress", *common, "--set", "train.max_steps=3", "--set", "train.lr=2e-2",
                 "--set", "data.num_train=12", "--set", "data.num_eval=2", "--set", f"output_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "forgetting: reference loss" in out and "KL(base||adapted)" in out
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--scale", "0",
                 "--dtype", "fp32",
                 "--out", str(tmp_path / "m0")]) == 0
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    m0 = AutoModelForCausalLM.from_pretrained(tmp_path / "m0")
    sd0 = m0.state_dict()
    assert all(torch.equal(v, sd0[k]) for k, v in base.state_dict().items())  # α = 0: the base, bit for bit
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}) + "\n")
    assert main(["wise-sweep", "--model", str(model_dir), "--adapter", str(run_dir / "adapter"), "--alphas",
                 "0,0.5,1", "--data", str(data), "--no-generate", "--reference-file", str(ref),
                 "--json", str(tmp_path / "sweep.json")]) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0] and rows[0]["kl_base_to_adapted_mean"] < 1e-6
    assert rows[2]["kl_base_to_adapted_mean"] > 0 and "target_loss" in rows[1]
    assert "| alpha | target_loss" in capsys.readouterr().out
