"""GGUF export against live references: transformers' own GGUF loader (logits and tokenizer read
back), transformers' reverse q/k permutation, and PEFT's merged weights for the adapter file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import deltatune
from deltatune.cli import main
from deltatune.export.gguf import GGUFExportError, export_adapter_gguf, export_model_gguf
from deltatune.models import load_model
from deltatune.testing import build_tiny_tokenizer, make_tiny_gpt2, make_tiny_llama

gguf = pytest.importorskip("gguf")


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {}
    for k, f in reader.fields.items():
        v = f.contents() if hasattr(f, "contents") else None
        fields[k] = v
    tensors = {t.name: gguf.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
               for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("outtype,tol", [("f32", 1e-6), ("f16", 3e-3), ("q8_0", 3e-2)])
def test_merged_model_reads_back_with_the_same_logits(tmp_path, tied, outtype, tol):
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), tie_word_embeddings=tied)
    path = export_model_gguf(model, tok, tmp_path / "m.gguf", outtype)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(0, len(tok), (2, 11), generator=torch.Generator().manual_seed(0))
    ref, got = _logits(model, ids), _logits(back, ids)
    # f16 rounds each weight to 11 bits, Q8_0 to 8 bits per 32-block: relative error bounds on the logits
    assert (ref - got).abs().max() <= tol * ref.abs().max()
    if outtype == "f32":
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    assert back.config.tie_word_embeddings == tied
    if outtype == "f32":
        tok_back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
        text = "What is the capital of France? <|im_end|> naïve"
        assert tok_back(text)["input_ids"] == tok(text)["input_ids"]


def test_q_and_k_rows_are_permuted_as_llama_cpp_does(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    _, tensors = _read(export_model_gguf(model, tok, tmp_path / "m.gguf", "f32"))
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for part, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        hf = getattr(model.model.layers[1].self_attn, part).weight.detach().numpy()
        stored = tensors[f"blk.1.{name}.weight"]
        undone = proc.process(weights=stored, name=f"blk.1.{name}.weight").weights  # transformers' inverse
        np.testing.assert_array_equal(undone, hf)
        assert (part == "v_proj") == np.array_equal(stored, hf)  # q/k permuted, v not


def _adapter(tmp_path: Path, model_dir: Path, **kw) -> tuple[Path, torch.nn.Module]:
    model, _ = load_model(model_dir, dtype="fp32")
    deltatune.inject(model, deltatune.LoraConfig(**kw))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for t in layer.factors("default"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return deltatune.save_adapter(model, tmp_path / "adapter"), model


def test_lora_adapter_file_layout_and_delta_match_peft(tmp_path, model_dir):
    peft = pytest.importorskip("peft")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    adir, _ = _adapter(tmp_path, model_dir, r=4, alpha=6, use_rslora=True,
                       target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"],
                       rank_pattern={"gate_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.v_proj": 3.0})
    cfg = json.loads((adir / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(model_dir.resolve())  # recorded, not null
    out = export_adapter_gguf(adir, AutoModelForCausalLM.from_pretrained(model_dir).config, tmp_path / "a.gguf")
    fields, tensors = _read(out)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    alpha = float(fields["adapter.lora.alpha"])
    assert alpha == pytest.approx(6 / 2 * 4)  # rsLoRA folded: s·r = (α/√r)·r
    assert sorted({k.rsplit(".", 1)[0] for k in tensors}) == sorted(
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate"))
    assert all(k.endswith((".lora_a", ".lora_b")) for k in tensors)
    # PEFT merges the same adapter file; ΔW by llama.cpp's formula must be its weight change.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    merged = peft.PeftModel.from_pretrained(base, adir).merge_and_unload().state_dict()
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj"}
    for i in range(2):
        for g, hf in names.items():
            a, b = tensors[f"blk.{i}.{g}.weight.lora_a"], tensors[f"blk.{i}.{g}.weight.lora_b"]
            delta = (alpha / a.shape[0]) * (b @ a)  # llama.cpp: scale = alpha / rank
            delta = proc.process(weights=delta, name=f"blk.{i}.{g}.weight").weights  # back to HF row order
            key = f"model.layers.{i}.{hf}.weight"
            np.testing.assert_allclose(delta, (merged[key] - w0[key]).numpy(), rtol=1e-4, atol=1e-5)
            assert np.abs(delta).max() > 1e-3


def test_cli_exports_merged_model_and_adapter(tmp_path, model_dir):
    adir, adapted = _adapter(tmp_path, model_dir, r=4, alpha=8, target_modules="all-linear")
    assert main(["export", "--format", "gguf", "--model", str(model_dir), "--adapter", str(adir), "--merge",
                 "--out", str(tmp_path / "merged.gguf"), "--outtype", "f32"]) == 0
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="merged.gguf", dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    ref = _logits(adapted, ids)
    torch.testing.assert_close(_logits(back, ids), ref, rtol=1e-5, atol=1e-5)
    assert main(["export", "--format", "gguf", "--model", str(model_dir), "--adapter", str(adir),
                 "--out", str(tmp_path / "lora.gguf")]) == 0
    fields, tensors = _read(tmp_path / "lora.gguf")
    assert fields["general.type"] == "adapter" and len(tensors) == 2 * 7 * 2


def test_refuses_what_gguf_cannot_hold(tmp_path, model_dir):
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    dora, _ = _adapter(tmp_path / "d", model_dir, r=2, use_dora=True)
    with pytest.raises(GGUFExportError, match="DoRA"):
        export_adapter_gguf(dora, config, tmp_path / "x.gguf")
    saved, _ = _adapter(tmp_path / "s", model_dir, r=2, modules_to_save=["lm_head"])
    with pytest.raises(GGUFExportError, match="modules_to_save"):
        export_adapter_gguf(saved, config, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="Llama-family"):
        export_model_gguf(make_tiny_gpt2(), build_tiny_tokenizer(), tmp_path / "g.gguf")
    lora_model = deltatune.inject(make_tiny_llama(), deltatune.LoraConfig(r=2))
    with pytest.raises(GGUFExportError, match="merge them first"):
        export_model_gguf(lora_model, build_tiny_tokenizer(), tmp_path / "l.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".x.gguf.*"))
