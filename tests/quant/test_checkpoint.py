"""4-bit checkpoints in the transformers + bitsandbytes layout, both ways.

Oracles: transformers + bitsandbytes themselves (CPU backend) — the config transformers writes for
a ``load_in_4bit`` model, its state dict, and its logits; a naive byte count of the 4-bit storage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from deltatune.cli import main
from deltatune.models import load_model
from deltatune.quant.checkpoint import checkpoint_storage_report, save_4bit_checkpoint
from deltatune.quant.linear4bit import Linear4bit, model_storage_report, quantize_model
from deltatune.testing import bnb_fp32_reference, build_tiny_tokenizer

IDS = torch.randint(4, 250, (2, 13), generator=torch.Generator().manual_seed(0))


def _bnb_config() -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def _fp_dir(tmp_path: Path, llama_factory: Any, tie: bool) -> Path:
    d = tmp_path / "fp"
    llama_factory(tie_word_embeddings=tie).save_pretrained(d)
    build_tiny_tokenizer().save_pretrained(d)
    return d


def _bnb_model(path: Path, **kw: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw).eval()
    return bnb_fp32_reference(model)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_our_checkpoint_loads_in_transformers_bitsandbytes(tie: bool, llama_factory: Any, tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    fp = _fp_dir(tmp_path, llama_factory, tie)
    # transformers' own 4-bit checkpoint of the same weights: the layout to match
    theirs = tmp_path / "theirs"
    _bnb_model(fp, quantization_config=_bnb_config()).save_pretrained(theirs)

    ours_model = quantize_model(llama_factory(tie_word_embeddings=tie), compute_dtype=torch.float32)
    out = save_4bit_checkpoint(ours_model, build_tiny_tokenizer(), tmp_path / "ours")
    cfg_ours = json.loads((out / "config.json").read_text())
    cfg_theirs = json.loads((theirs / "config.json").read_text())
    assert cfg_ours["quantization_config"] == cfg_theirs["quantization_config"]
    assert "quantization_config" not in ours_model.config.to_dict()  # the live model is left as it was
    assert (out / "tokenizer.json").is_file()
    sd_ours, sd_theirs = load_file(out / "model.safetensors"), load_file(theirs / "model.safetensors")
    assert sd_ours.keys() == sd_theirs.keys()
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert sd_ours[key].dtype == torch.uint8 and torch.equal(sd_ours[key], sd_theirs[key])  # same codes

    loaded = _bnb_model(out)  # no quantization_config argument: read from config.json
    assert isinstance(loaded.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, ours_model(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_transformers_checkpoint_loads_into_deltatune_linear4bit(tie: bool, llama_factory: Any,
                                                                 tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    fp = _fp_dir(tmp_path, llama_factory, tie)
    ref = _bnb_model(fp, quantization_config=_bnb_config())
    q4 = tmp_path / "q4"
    ref.save_pretrained(q4)
    build_tiny_tokenizer().save_pretrained(q4)

    model, tok = load_model(q4, dtype="fp32")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(layers) == 14 and all(m.compute_dtype == torch.float32 for m in layers)  # 7 linears × 2 blocks
    assert type(model.lm_head) is nn.Linear and not any("bitsandbytes" in type(m).__module__ for m in model.modules())
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    # and it writes back the same tensors it read
    out = save_4bit_checkpoint(model, tok, tmp_path / "again")
    a, b = load_file(out / "model.safetensors"), load_file(q4 / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("skip", "written"),
    [(["lm_head"], None), ([], []), (["lm_head", "down_proj"],
                                     ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"])],
    ids=["default", "nothing", "more"],
)
def test_skip_modules_round_trip_through_bitsandbytes(skip: list[str], written: list[str] | None,
                                                      llama_factory: Any, tmp_path: Path) -> None:
    """The skip list we write makes transformers quantize exactly the linears we quantized."""
    bnb = pytest.importorskip("bitsandbytes")
    model = quantize_model(llama_factory(), compute_dtype=torch.float32, skip_modules=skip)
    out = save_4bit_checkpoint(model, None, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == written
    loaded = _bnb_model(out)
    ours_4bit = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    theirs_4bit = {n for n, m in loaded.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert ours_4bit == theirs_4bit
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_storage_report_from_file_matches_model_and_byte_formula(llama_factory: Any, tmp_path: Path) -> None:
    model = quantize_model(llama_factory(), compute_dtype=torch.float32)
    out = save_4bit_checkpoint(model, None, tmp_path / "q")
    rep_file = checkpoint_storage_report(out)
    rep_model = model_storage_report(model)
    # naive count per 4-bit weight of n values (block 64, double quant): n/2 code bytes, n/64 uint8
    # absmax codes, fp32 nested absmax per 256 blocks, 16 + 256 fp32 code tables, fp32 offset
    packed = stats = n4 = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            n = m.in_features * m.out_features
            packed, n4 = packed + n // 2, n4 + n
            stats += n // 64 + 4 * math.ceil(n / 64 / 256) + 4 * 16 + 4 * 256 + 4
    assert rep_file["nf4_packed"] == rep_model["nf4_packed"] == packed
    assert rep_file["quant_stats"] == rep_model["quant_stats"] == stats
    assert rep_file["params_4bit"] == rep_model["params_4bit"] == n4
    # fp32: the file lacks only the non-persistent buffers (rotary inv_freq)
    persistent = set(model.state_dict())
    extra = sum(b.numel() * 4 for n, b in model.named_buffers() if n not in persistent)
    assert rep_file["float32"] == rep_model["float32"] - extra > 0
    assert rep_file["quant_metadata"] > 0 and "uint8" not in rep_file
    assert rep_file["total"] == sum(v for k, v in rep_file.items() if k not in ("total", "params_4bit"))


def test_cli_quantize_info_and_atomic_replace(llama_factory: Any, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    fp = _fp_dir(tmp_path, llama_factory, tie=True)
    out = tmp_path / "q4"
    assert main(["quantize", str(fp), "--out", str(out), "--dtype", "fp32", "--compute-dtype", "fp32",
                 "--block-size", "128"]) == 0
    printed = capsys.readouterr().out
    assert "nf4_packed" in printed and "4-bit weights: 73,728 parameters" in printed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_compute_dtype"] == "float32" and qc["bnb_4bit_use_double_quant"] is True
    model, _ = load_model(out, dtype="fp32")
    q = model.get_submodule("model.layers.0.self_attn.o_proj")
    assert isinstance(q, Linear4bit) and q.quant_state.block_size == 128
    ref = quantize_model(llama_factory(tie_word_embeddings=True), 128, compute_dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)

    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantization: bitsandbytes 4-bit nf4" in text and "quant_stats" in text and "float32" in text

    # an existing model directory is replaced whole; anything else is refused
    assert main(["quantize", str(fp), "--out", str(out), "--dtype", "fp32", "--no-double-quant"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bnb_4bit_use_double_quant"] is False
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    assert main(["quantize", str(fp), "--out", str(other), "--dtype", "fp32"]) == 2
    assert (other / "todo.txt").read_text() == "keep me"


def test_train_lora_over_a_4bit_checkpoint_equals_method_qlora(tmp_path: Path) -> None:
    """QLoRA from a pre-quantized checkpoint (``--set model.spec=<4-bit dir> --set method=lora``) is
    method ``qlora`` on the 16-bit model: same storage report, same losses, same adapter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    fp = tmp_path / "fp"
    LlamaForCausalLM(cfg).save_pretrained(fp)
    tok.save_pretrained(fp)
    assert main(["quantize", str(fp), "--out", str(tmp_path / "q4"), "--dtype", "fp32"]) == 0
    q4 = tmp_path / "q4"
    before = load_file(q4 / "model.safetensors")
    summaries, losses = {}, {}
    for spec, method in ((q4, "lora"), (fp, "qlora")):
        run = tmp_path / f"run-{method}"
        sets = [f"model.spec={spec}", f"method={method}", "model.dtype=fp32", "data.num_train=8", "data.num_eval=2",
                "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2", f"output_dir={run}",
                "eval.exact_match=false", "train.bf16=false", "lora.r=4", "lora.target_modules=all-linear"]
        assert main(["train", "--no-progress", *[a for kv in sets for a in ("--set", kv)]]) == 0
        summaries[method] = json.loads((run / "summary.json").read_text())
        losses[method] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert losses["lora"] == losses["qlora"]
    storage = summaries["qlora"]["storage_bytes"]
    assert summaries["lora"]["storage_bytes"] == storage
    # naive count: 14 linears in 4 bits; fp32 = tied embedding (once) + 5 norms + LoRA A/B + the rotary
    # buffers inv_freq and original_inv_freq (head_dim / 2 each)
    lora_params = 2 * 4 * sum(i + o for i, o in [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128),
                                                 (128, 64)])
    assert summaries["qlora"]["trainable_params"] == lora_params
    n4 = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)
    assert storage["params_4bit"] == n4 and storage["nf4_packed"] == n4 // 2
    assert storage["float32"] == 4 * (len(tok) * 64 + 5 * 64 + lora_params + 2 * 16 // 2)
    # the adapter loads onto the 4-bit model and changes its output; the checkpoint is untouched
    from deltatune import load_adapter

    model, _ = load_model(q4, dtype="fp32")
    ids = IDS % len(tok)
    with torch.no_grad():
        base = model(ids).logits
        adapted = load_adapter(model, tmp_path / "run-lora" / "adapter")(ids).logits
    assert not torch.allclose(base, adapted)
    after = load_file(q4 / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
