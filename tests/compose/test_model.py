"""Composition on a loaded model: weighted activation (no ΔW formed), add_weighted_adapter, and
merging a weighted combination into 16-bit and 4-bit bases."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune import compose
from deltatune.testing import make_tiny_llama

IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _two(base: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(base)
    deltatune.inject(m, deltatune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name="a")
    deltatune.inject(m, deltatune.LoraConfig(r=2, alpha=2, use_rslora=True, target_modules=["v_proj", "up_proj"]), name="b")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def _naive_logits(base: torch.nn.Module, m: torch.nn.Module, weights: dict[str, float]) -> torch.Tensor:
    """W₀ + Σ λ s BA written into a copy of the plain base, in fp64."""
    ref = copy.deepcopy(base).double()
    with torch.no_grad():
        for path, layer in deltatune.lora_layers(m):
            w = ref.get_submodule(path).weight
            for n, lam in weights.items():
                if n in layer.adapters:
                    a, b = layer.factors(n)
                    w += lam * layer.adapters[n].scale * (b.double() @ a.double())
        return ref(IDS).logits.float()


def test_weighted_activation_equals_naive_and_cat() -> None:
    base = make_tiny_llama(vocab_size=64)
    m = _two(base)
    w = {"a": 0.7, "b": -0.3}
    compose.set_weighted(m, w)
    with torch.no_grad():
        got = m(IDS).logits
    want = _naive_logits(base, m, w)
    assert (want - base(IDS).logits).abs().max() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # set_active drops the weights again: plain sum
    deltatune.set_active(m, ["a", "b"])
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, _naive_logits(base, m, {"a": 1.0, "b": 1.0}), rtol=1e-4, atol=1e-5)
    # the exact composed adapter gives the same output
    compose.add_weighted_adapter(m, ["a", "b"], [0.7, -0.3], "ab", "cat")
    assert m.deltatune_state.active == ["a", "b"]  # not activated, as in PEFT
    deltatune.set_active(m, "ab")
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits, want, rtol=1e-4, atol=1e-5)


def test_per_sample_routing_keeps_weights() -> None:
    base = make_tiny_llama(vocab_size=64)
    m = _two(base)
    compose.set_weighted(m, {"a": 0.5, "b": 2.0})
    with torch.no_grad():
        full = m(IDS).logits
        with deltatune.adapter_per_sample(m, ["a", None]):
            routed = m(IDS).logits
    only_a = _naive_logits(base, m, {"a": 0.5})
    torch.testing.assert_close(routed[0], only_a[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(routed[1], base(IDS).logits[1], rtol=1e-5, atol=1e-5)
    assert (full[0] - routed[0]).abs().max() > 1e-3


def test_tensor_weights_get_gradients() -> None:
    base = make_tiny_llama(vocab_size=64)
    m = _two(base)
    lam = {"a": torch.tensor(0.5, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    compose.set_weighted(m, lam)
    m.requires_grad_(False)
    m(IDS).logits.square().mean().backward()
    eps = 1e-3
    for n in ("a", "b"):
        assert lam[n].grad is not None and lam[n].grad.abs() > 0
        # finite difference in λ_n
        vals = {}
        for sgn in (1, -1):
            compose.set_weighted(m, {k: float(v) + (sgn * eps if k == n else 0.0) for k, v in lam.items()})
            with torch.no_grad():
                vals[sgn] = float(m(IDS).logits.double().square().mean())
        assert float(lam[n].grad) == pytest.approx((vals[1] - vals[-1]) / (2 * eps), rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_weighted_16bit(dtype: torch.dtype) -> None:
    base = make_tiny_llama(vocab_size=64).to(dtype)
    m = _two(base)
    w = {"a": 0.7, "b": -0.3}
    compose.set_weighted(m, w)
    with torch.no_grad():
        unmerged = m(IDS).logits.float()
        compose.merge_weighted(m, w)
        merged = m(IDS).logits.float()
    tol = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
    deltatune.unmerge(m)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS).logits.float(), unmerged, rtol=tol, atol=tol)
    compose.merge_weighted(m, w)
    with pytest.raises(RuntimeError, match="merged adapters"):  # reweighting would unmerge the wrong ΔW
        compose.set_weighted(m, {"a": 1.0})


def test_merge_weighted_4bit_requantizes_once() -> None:
    from deltatune.quant.linear4bit import quantize_model
    from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit

    base = make_tiny_llama(vocab_size=64)
    quantize_model(base, compute_dtype=torch.float32)
    m = _two(base)
    w = {"a": 0.7, "b": -0.3}
    layer = m.get_submodule("model.layers.0.self_attn.v_proj")
    q = layer.base_layer
    w0 = q.dequantized_weight(torch.float32).clone()
    total = sum(lam * layer.adapters[n].scale * (layer.factors(n)[1] @ layer.factors(n)[0]) for n, lam in w.items())
    s = q.quant_state
    packed, state = quantize_4bit((w0 + total.detach()).to(s.dtype), s.block_size, s.nested, s.quant_type)
    want = dequantize_4bit(packed, state, torch.float32).view_as(w0)
    compose.merge_weighted(m, w)
    torch.testing.assert_close(q.dequantized_weight(torch.float32), want, rtol=0, atol=0)


def test_dora_only_with_weight_one() -> None:
    base = make_tiny_llama(vocab_size=64)
    m = copy.deepcopy(base)
    deltatune.inject(m, deltatune.LoraConfig(r=4, use_dora=True), name="d")
    deltatune.inject(m, deltatune.LoraConfig(r=4), name="p")
    compose.set_weighted(m, {"d": 1.0, "p": 0.5})
    with pytest.raises(compose.CompositionError, match=r"'d', module .*DoRA"):
        compose.set_weighted(m, {"d": 0.5, "p": 0.5})
    with pytest.raises(compose.CompositionError, match="'d', module .*DoRA"):
        compose.add_weighted_adapter(m, ["d", "p"], [1, 1], "x", "cat")
