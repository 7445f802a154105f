"""PiSSA / OLoRA initialisation: naive SVD/QR written here, PEFT as the oracle, and the saved file as an
ordinary LoRA on the untouched original base."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import LoraConfig
from deltatune.methods import lora_init
from deltatune.methods.lora import LoraLayer
from deltatune.testing import make_tiny_gpt2, make_tiny_llama

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]


def layer_with(base: nn.Module, init: str, r: int = 4, alpha: float = 8) -> LoraLayer:
    layer = LoraLayer(base)
    layer.add("a", r=r, alpha=alpha)
    lora_init.initialise(layer, "a", init)
    layer.active = ["a"]
    return layer


def train_a_little(model: nn.Module) -> None:
    """Stand-in for training: move every A and B away from their initial values."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.abs().mean())


# ----------------------------------------------------------------------------- the decompositions
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_is_the_principal_part(kind: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24) if kind == "linear" else Conv1D(24, 32)
    w0 = (base.weight if kind == "linear" else base.weight.T).detach().clone()  # (d, k)
    x = torch.randn(5, 32)
    before = base(x)
    layer = layer_with(base, "pissa")
    a, b = layer.factors("a")
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    principal = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    torch.testing.assert_close(2.0 * b @ a, principal, rtol=1e-5, atol=1e-5)  # s = alpha/r = 2
    residual = base.weight if kind == "linear" else base.weight.T
    torch.testing.assert_close(residual, w0 - principal, rtol=1e-5, atol=1e-5)
    # A = √(S/s)·Vᵀ: its rows are orthogonal with squared norms S_r/s
    torch.testing.assert_close(a @ a.T, torch.diag(s[:4] / 2.0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_olora_is_the_leading_qr_part() -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    w0 = base.weight.detach().clone()
    x = torch.randn(5, 32)
    before = base(x)
    layer = layer_with(base, "olora", alpha=4)  # s = 1
    a, b = layer.factors("a")
    q, r = torch.linalg.qr(w0)
    torch.testing.assert_close(b, q[:, :4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, r[:4], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.T @ b, torch.eye(4), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base.weight, w0 - b @ a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_pissa_niter_approximates_the_full_svd() -> None:
    """Randomized SVD (K subspace iterations) on a matrix with a clear spectral gap finds the same
    principal part as the full SVD; the residual + adapter is W₀ exactly either way."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    s = torch.cat([torch.tensor([8.0, 6.0, 5.0, 4.0]), 0.05 * torch.rand(36, generator=g)])
    base = nn.Linear(40, 48, bias=False)
    with torch.no_grad():
        base.weight.copy_(u[:, :40] @ torch.diag(s) @ v.T)
    w0 = base.weight.detach().clone()
    torch.manual_seed(0)
    layer = layer_with(base, "pissa_niter_4")
    a, b = layer.factors("a")
    principal = u[:, :4] @ torch.diag(s[:4]) @ v[:, :4].T
    torch.testing.assert_close(2.0 * b @ a, principal, rtol=0, atol=1e-3)
    torch.testing.assert_close(base.weight + 2.0 * b @ a, w0, rtol=1e-6, atol=1e-6)


def test_unknown_or_unsupported_init_is_an_error_before_any_change() -> None:
    model = make_tiny_llama()
    before = model(IDS).logits
    with pytest.raises(ValueError, match="choose one of"):
        deltatune.inject(model, LoraConfig(target_modules=TARGETS, init="pisa"))
    with pytest.raises(ValueError, match="Linear/Conv1D"):
        deltatune.inject(model, LoraConfig(target_modules=["q_proj", "embed_tokens"], init="olora"))
    assert not hasattr(model, "deltatune_state")
    torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)


# ----------------------------------------------------------------------------- PEFT as the oracle
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_matches_peft_init(init: str) -> None:
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    ours = copy.deepcopy(base)
    deltatune.inject(ours, LoraConfig(r=4, alpha=8, target_modules=TARGETS, init=init))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init))
    want = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items()}
    got = ours.state_dict()
    assert got.keys() == want.keys()
    for k in got:  # factors and the residual base weights
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(IDS).logits, base(IDS).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- saving: an ordinary LoRA
@pytest.mark.parametrize("init,dora,make", [("pissa", False, make_tiny_llama), ("olora", False, make_tiny_llama),
                                            ("pissa_niter_2", False, make_tiny_gpt2), ("pissa", True, make_tiny_llama)],
                         ids=["pissa", "olora", "pissa_niter-gpt2", "pissa-dora"])
def test_saved_adapter_on_original_base_reproduces_trained_model(init: str, dora: bool, make, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    original = make()
    targets = TARGETS if make is make_tiny_llama else ["c_attn", "c_fc"]
    model = copy.deepcopy(original)
    deltatune.inject(model, LoraConfig(r=4, alpha=8, target_modules=targets, init=init, use_dora=dora))
    train_a_little(model)
    trained = model(IDS).logits
    assert (trained - original(IDS).logits).abs().max() > 1e-3
    deltatune.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"], cfg["use_dora"]) == (8, 16, True, dora)
    loaded = deltatune.load_adapter(copy.deepcopy(original), tmp_path)  # an untouched original base
    torch.testing.assert_close(loaded(IDS).logits, trained, rtol=1e-5, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    torch.testing.assert_close(theirs(IDS).logits, trained, rtol=1e-5, atol=1e-5)


def test_saved_tensors_equal_peft_weight_conversion(tmp_path: Path) -> None:
    """PEFT's path_initial_model_for_weight_conversion on the same trained weights writes the same file."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base = make_tiny_llama()
    ours = copy.deepcopy(base)
    deltatune.inject(ours, LoraConfig(r=4, alpha=8, target_modules=TARGETS, init="pissa"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    theirs.peft_config["default"].init_lora_weights = True
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    train_a_little(ours)
    theirs.base_model.model.load_state_dict(ours.state_dict())
    theirs.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    deltatune.save_adapter(ours, tmp_path / "ours")
    want = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    got = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    cfg_peft = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    cfg_ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg_ours["r"], cfg_ours["lora_alpha"]) == (cfg_peft["r"], cfg_peft["lora_alpha"])


def test_peft_unconverted_pissa_file_loads_with_the_init_rerun(tmp_path: Path) -> None:
    """A PEFT file saved without conversion says init_lora_weights='pissa': loading re-runs PiSSA on the
    base (leaving the residual), then sets the trained factors — as PEFT does."""
    peft = pytest.importorskip("peft")
    base = make_tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="pissa"))
    train_a_little(theirs)
    want = theirs(IDS).logits
    theirs.save_pretrained(tmp_path)
    loaded = deltatune.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(IDS).logits, want, rtol=1e-5, atol=1e-5)
