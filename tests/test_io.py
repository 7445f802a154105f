"""Adapter files: PEFT parity both ways, fingerprints, and bad input that leaves the model untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune import AdapterFileError, AdapterMismatchError, LoraConfig

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()


def nonzero(params) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in params:
            if "lora_B" in name or "lora_embedding_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if "lora_embedding_A" in name:  # PEFT initialises embedding A to zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


CASES = [
    ("llama-qv", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama-all-rslora-patterns", tiny_llama,
     dict(r=4, alpha=8, target_modules="all-linear", use_rslora=True,
          rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3.0})),
    ("llama-embedding", tiny_llama, dict(r=4, alpha=4, target_modules=["embed_tokens", "q_proj"])),
    ("llama-modules-to-save", tiny_llama, dict(r=4, alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("gpt2-all", tiny_gpt2, dict(r=4, alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_deltatune_file_loads_in_peft_with_same_logits(case, tmp_path: Path) -> None:
    _, make, kw = case
    model = make()
    deltatune.inject(model, LoraConfig(**kw))
    nonzero(model.named_parameters())
    ours = model(IDS).logits
    assert (ours - make()(IDS).logits).abs().max() > 1e-3
    deltatune.save_adapter(model, tmp_path / "a")
    peft_model = peft.PeftModel.from_pretrained(make(), tmp_path / "a").eval()
    torch.testing.assert_close(peft_model(IDS).logits, ours, rtol=1e-5, atol=1e-5)


def _peft_config(kw: dict) -> peft.LoraConfig:
    mapping = dict(r=kw["r"], lora_alpha=kw["alpha"], target_modules=kw["target_modules"],
                   use_rslora=kw.get("use_rslora", False), rank_pattern=kw.get("rank_pattern", {}),
                   alpha_pattern=kw.get("alpha_pattern", {}), modules_to_save=kw.get("modules_to_save"))
    return peft.LoraConfig(**mapping)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_peft_file_loads_in_deltatune_with_same_logits(case, tmp_path: Path) -> None:
    _, make, kw = case
    pm = peft.get_peft_model(make(), _peft_config(kw)).eval()
    nonzero(pm.named_parameters())
    want = pm(IDS).logits
    pm.save_pretrained(tmp_path / "p")
    model = deltatune.load_adapter(make(), tmp_path / "p")
    torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference by default


def test_round_trip_and_trainable_load(tmp_path: Path) -> None:
    model = tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear", bias="all"))
    nonzero(model.named_parameters())
    want = model(IDS).logits
    deltatune.save_adapter(model, tmp_path / "a")
    loaded = deltatune.load_adapter(tiny_llama(), tmp_path / "a", name="x", trainable=True)
    torch.testing.assert_close(loaded(IDS).logits, want, rtol=1e-6, atol=1e-6)
    assert any(p.requires_grad for n, p in loaded.named_parameters() if ".lora_A.x." in n)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and len(cfg["target_modules"]) == 14


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not hasattr(model, "deltatune_state") and not list(deltatune.lora_layers(model))


def test_wrong_base_is_a_clear_error_and_model_unchanged(tmp_path: Path) -> None:
    model = tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    deltatune.save_adapter(model, tmp_path / "a")
    other = tiny_llama(hidden=32)
    before = _state(other)
    with pytest.raises(AdapterMismatchError, match=r"model\.layers\.0\.\S+.*shape \[4, 64\] in the file but the model needs \[4, 32\]"):
        deltatune.load_adapter(other, tmp_path / "a")
    _assert_untouched(other, before)
    gpt = tiny_gpt2()
    before = _state(gpt)
    with pytest.raises(AdapterMismatchError, match="does not exist in GPT2LMHeadModel"):
        deltatune.load_adapter(gpt, tmp_path / "a")
    _assert_untouched(gpt, before)


def test_same_shapes_different_weights_warns(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    deltatune.save_adapter(model, tmp_path / "a")
    with pytest.warns(UserWarning, match="differ from those the adapter was trained on"):
        deltatune.load_adapter(tiny_llama(seed=1), tmp_path / "a")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad-json"])
def test_corrupted_files_are_clear_errors(damage: str, tmp_path: Path) -> None:
    model = tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    d = deltatune.save_adapter(model, tmp_path / "a")
    w = d / "adapter_model.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "garbage":
        w.write_bytes(b"\x00" * 64)
    else:
        (d / "adapter_config.json").write_text('{"r": 4,\n "peft_type": LORA}')
    fresh = tiny_llama()
    before = _state(fresh)
    with pytest.raises(AdapterFileError, match=r"adapter_model\.safetensors|adapter_config\.json:2"):
        deltatune.load_adapter(fresh, d)
    _assert_untouched(fresh, before)


def test_unload_saves_plain_checkpoint(tmp_path: Path) -> None:
    model = tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    nonzero(model.named_parameters())
    want = model(IDS).logits
    plain = deltatune.unload(model)
    plain.save_pretrained(tmp_path / "m")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(back(IDS).logits, want, rtol=1e-5, atol=1e-5)
