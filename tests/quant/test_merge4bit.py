"""Merging LoRA into a 4-bit base with the error reported: the report against a naive
recomputation (requantize Ŵ + s·BA with the pure nf4 functions, forward, compare), its
invariants (input model left unmerged, a too-small ΔW is reported as rounded away), and
``deltatune merge --into-4bit`` end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import deltatune
from deltatune.cli import main
from deltatune.data import reference_batches
from deltatune.models import load_model
from deltatune.quant.linear4bit import Linear4bit, quantize_model
from deltatune.quant.merge import (
    merge_error_report,
    merge_error_reports,
    merged_4bit_copy,
    quantize_like,
)
from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit
from deltatune.testing import build_tiny_tokenizer

G = torch.Generator().manual_seed(0)
BATCHES = [{"input_ids": torch.randint(4, 250, (2, 12), generator=G),
            "attention_mask": torch.tensor([[1] * 12, [1] * 9 + [0] * 3])} for _ in range(2)]


def _qlora(llama_factory: Any, b_std: float) -> Any:
    model = quantize_model(llama_factory(), compute_dtype=torch.float32)
    torch.manual_seed(1)
    deltatune.inject(model, deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            b = layer.factors("default")[1]
            b.copy_(torch.randn(b.shape, generator=g) * b_std)  # B ≠ 0: the adapter changes the output
    return model


def _naive_merged(model: Any) -> Any:
    """Every LoRA-wrapped Linear4bit replaced by quantize(dequant(W) + (α/r)·B·A), written out here."""
    ref = copy.deepcopy(model)
    for path, layer in list(deltatune.lora_layers(ref)):
        base = layer.base_layer
        a, b = layer.factors("default")  # (r, k), (d, r)
        w = dequantize_4bit(base.weight, base.quant_state, torch.float32) + (8 / 4) * b @ a  # (d, k)
        packed, state = quantize_4bit(w)
        base.weight.data, base.quant_state = packed, state
        parent, _, child = path.rpartition(".")
        setattr(ref.get_submodule(parent), child, base)
    del ref.deltatune_state
    return ref


def load_adapter_quiet(model: Any, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # a QLoRA adapter's base checksums are of the 4-bit weights
        warnings.simplefilter("ignore")
        deltatune.load_adapter(model, path)


def _ppl(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return float(ce), int((labels != -100).sum())


def test_report_matches_naive_requantization(llama_factory: Any) -> None:
    model = _qlora(llama_factory, 0.05)
    with torch.no_grad():
        before = [model(**b).logits for b in BATCHES]
    rep = merge_error_report(model, BATCHES)
    ref = _naive_merged(model)
    max_diff, ce_a, ce_m, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for b, lg in zip(BATCHES, before):
            lm = ref(**b).logits
            keep = b["attention_mask"].bool()
            max_diff = max(max_diff, float((lm - lg).abs()[keep].max()))
            ca, n_b = _ppl(lg, b)
            cm, _ = _ppl(lm, b)
            ce_a, ce_m, n = ce_a + ca, ce_m + cm, n + n_b
    assert rep["tokens"] == 12 + 9 + 12 + 9 and rep["loss_tokens"] == n
    assert rep["max_abs_logit_diff"] == pytest.approx(max_diff, rel=1e-5, abs=1e-6)
    assert rep["max_abs_logit_diff"] > 0  # requantization is lossy
    assert rep["ppl_adapter"] == pytest.approx(math.exp(ce_a / n), rel=1e-5)
    assert rep["ppl_merged"] == pytest.approx(math.exp(ce_m / n), rel=1e-5)
    assert rep["ppl_change"] == pytest.approx(rep["ppl_merged"] - rep["ppl_adapter"], rel=1e-9)
    assert rep["max_abs_logit_adapter"] > rep["max_abs_logit_diff"]  # the adapter's effect survives merging
    assert rep["layers_measured"] == 14 and 0.5 < rep["delta_retained_mean"] <= 1.2
    # the input model is left unmerged and unchanged
    assert all(not layer.merged for _, layer in deltatune.lora_layers(model))
    with torch.no_grad():
        for b, lg in zip(BATCHES, before):
            assert torch.equal(model(**b).logits, lg)


def test_too_small_delta_is_reported_as_rounded_away(llama_factory: Any) -> None:
    """ΔW far below half an NF4 step (absmax/~20 per block) is mostly lost: the report says so."""
    big = merge_error_report(_qlora(llama_factory, 0.05), BATCHES)
    tiny = merge_error_report(_qlora(llama_factory, 1e-5), BATCHES)
    assert tiny["delta_retained_mean"] < 0.5 < big["delta_retained_mean"]
    assert tiny["requant_error_over_delta_mean"] > big["requant_error_over_delta_mean"]


def test_merged_copy_has_no_wrappers_and_refuses_a_16bit_base(llama_factory: Any) -> None:
    merged = merged_4bit_copy(_qlora(llama_factory, 0.05))
    assert not list(deltatune.lora_layers(merged)) and not hasattr(merged, "deltatune_state")
    assert isinstance(merged.get_submodule("model.layers.1.mlp.up_proj"), Linear4bit)
    plain = llama_factory()
    deltatune.inject(plain, deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="nothing to merge into 4 bits"):
        merged_4bit_copy(plain)


def _pair(llama_factory: Any, b_std: float) -> tuple[Any, Any]:
    """(QLoRA model, the 16-bit model with the very same adapter): merge strategies start from these."""
    fp = llama_factory()
    q = quantize_model(copy.deepcopy(fp), compute_dtype=torch.float32)
    for m in (q, fp):
        torch.manual_seed(1)
        deltatune.inject(m, deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for (_, lq), (_, lf) in zip(deltatune.lora_layers(q), deltatune.lora_layers(fp)):
            b = torch.randn(lq.factors("default")[1].shape, generator=g) * b_std
            lq.factors("default")[1].copy_(b)
            lf.factors("default")[1].copy_(b)
    return q, fp


def test_quantize_like_copies_each_layers_settings(llama_factory: Any) -> None:
    ref = quantize_model(llama_factory(), block_size=128, double_quant=False, compute_dtype=torch.float32,
                         skip_modules=("lm_head", "down_proj"))
    out = quantize_like(llama_factory(), ref)
    assert {n for n, m in out.named_modules() if isinstance(m, Linear4bit)} == \
        {n for n, m in ref.named_modules() if isinstance(m, Linear4bit)}
    a, b = out.get_submodule("model.layers.1.self_attn.v_proj"), ref.get_submodule("model.layers.1.self_attn.v_proj")
    assert a.quant_state.block_size == 128 and not a.quant_state.nested
    assert torch.equal(a.weight, b.weight)  # same fp32 weights, same settings: same codes


def test_from_16bit_keeps_a_small_delta_that_requantizing_erases(llama_factory: Any) -> None:
    """Ŵ sits on an NF4 level, so Q(Ŵ + ΔW) drops a ΔW under half a step; W lies between levels, so
    Q(W + ΔW) moves codes in proportion to ΔW (retained ≈ 1 on average, plus rounding noise)."""
    q, fp = _pair(llama_factory, 0.003)
    candidates = {"requantize": merged_4bit_copy(q), "from_16bit": quantize_like(deltatune.unload(fp), q)}
    both = merge_error_reports(q, BATCHES, candidates)  # one pass, shared adapter/base forwards
    requant, from16 = both["requantize"], both["from_16bit"]
    assert requant["delta_retained_mean"] < 0.5
    assert 0.8 < from16["delta_retained_mean"] < 1.2
    assert merge_error_report(q, BATCHES, candidates["from_16bit"]) == from16


def test_cli_merge_into_4bit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    fp = tmp_path / "fp"
    LlamaForCausalLM(cfg).save_pretrained(fp)
    tok.save_pretrained(fp)
    # a QLoRA adapter with B ≠ 0, as method qlora trains it (quantize, then LoRA)
    model, _ = load_model(fp, dtype="fp32")
    quantize_model(model, compute_dtype=torch.float32)
    deltatune.inject(model, deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            layer.factors("default")[1].normal_(std=0.05)
    deltatune.save_adapter(model, tmp_path / "adapter")

    out = tmp_path / "merged4"
    assert main(["merge", "--model", str(fp), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--into-4bit", "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "max |Δ logit|" in text and "perplexity on" in text and "ΔW kept:" in text
    report = json.loads((out / "merge_report.json").read_text())
    assert report["max_abs_logit_diff"] > 0 and report["layers_measured"] == 14
    # both strategies were measured; the written checkpoint is the one with the lower mean |Δ logit|
    strategies = report["strategies"]
    assert set(strategies) == {"requantize", "from_16bit"}
    assert report["strategy"] == min(strategies, key=lambda k: strategies[k]["mean_abs_logit_diff"])
    assert "not written:" in text
    fp_merged, _ = load_model(fp, dtype="fp32")
    load_adapter_quiet(fp_merged, tmp_path / "adapter")
    expected = {"requantize": merged_4bit_copy(model),
                "from_16bit": quantize_model(deltatune.unload(fp_merged), compute_dtype=torch.float32)}
    loaded, _ = load_model(out, dtype="fp32")
    assert sum(isinstance(m, Linear4bit) for m in loaded.modules()) == 14
    ids = reference_batches(tok, max_length=64, batch_size=2, num_examples=2)[0]
    kw = {k: ids[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(loaded(**kw).logits, expected[report["strategy"]](**kw).logits)
    # the report's reference text is the built-in task's held-out split by default, or --data
    data = tmp_path / "ref.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"reference sentence number {i}."}) for i in range(5)))
    assert main(["merge", "--model", str(fp), "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                 "--into-4bit", "--dtype", "fp32", "--data", str(data)]) == 0
    assert json.loads((out / "merge_report.json").read_text())["loss_tokens"] < report["loss_tokens"]
