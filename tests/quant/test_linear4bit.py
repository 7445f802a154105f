"""Linear4bit: forward/backward against F.linear on the dequantized weight, memory of the
autograd graph, state-dict layout and a transformers+bitsandbytes checkpoint."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.quant.linear4bit import Linear4bit, model_storage_report, quantize_model
from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit
from deltatune.testing import bnb_fp32_reference


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_match_dequantized_linear(compute_dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(96, 80, bias=bias)
    q = Linear4bit.from_linear(lin, compute_dtype=compute_dtype)
    w_hat = q.dequantized_weight(compute_dtype)  # (out, in)
    assert w_hat.shape == (80, 96)
    # the weight equals the pure function applied to the layer's own weight
    p, s = quantize_4bit(lin.weight.detach())
    assert torch.equal(q.weight, p) and torch.equal(w_hat, dequantize_4bit(p, s, compute_dtype))

    x = torch.randn(3, 5, 96, requires_grad=True)
    y = q(x)
    assert y.dtype == x.dtype and y.shape == (3, 5, 80)
    x_ref = x.detach().to(compute_dtype).requires_grad_(True)
    b = None if lin.bias is None else lin.bias.detach().to(compute_dtype)
    y_ref = F.linear(x_ref, w_hat, b)
    tol = {"atol": 1e-5, "rtol": 1e-5} if compute_dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(y, y_ref.to(y.dtype), **tol)

    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g.to(compute_dtype))
    assert x.grad is not None and x_ref.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad.to(x.grad.dtype), **tol)
    assert q.weight.grad is None and not q.weight.requires_grad
    assert all(not p.requires_grad for p in q.parameters())


def test_graph_saves_packed_weight_not_dequantized() -> None:
    torch.manual_seed(1)
    q = Linear4bit.from_linear(nn.Linear(256, 192), compute_dtype=torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert any(t.dtype == torch.uint8 and t.numel() == 256 * 192 // 2 for t in saved)
    for t in saved:  # nothing of the weight's size in a floating dtype
        assert not (t.is_floating_point() and t.numel() >= 256 * 192 // 2), (t.dtype, tuple(t.shape))


def test_state_dict_layout_and_round_trip() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32, bias=False))
    quantize_model(model, skip_modules=())
    sd = model.state_dict()
    assert list(sd)[:7] == [
        "0.weight",
        "0.bias",
        "0.weight.absmax",
        "0.weight.quant_map",
        "0.weight.nested_absmax",
        "0.weight.nested_quant_map",
        "0.weight.quant_state.bitsandbytes__nf4",
    ]
    assert sd["0.weight"].dtype == torch.uint8 and sd["0.weight"].shape == (64 * 48 // 2, 1)

    fresh = nn.Sequential(
        Linear4bit(64, 48, block_size=128, double_quant=False), nn.ReLU(), Linear4bit(48, 32, bias=False)
    )
    fresh.load_state_dict(sd)  # strict: no missing/unexpected keys
    x = torch.randn(7, 64)
    assert torch.equal(fresh(x), model(x))
    for a, b in zip(fresh.state_dict().values(), sd.values()):
        assert torch.equal(a, b)


def test_load_float_checkpoint_quantizes() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(64, 40)
    q = Linear4bit(64, 40, block_size=128)
    q.load_state_dict(lin.state_dict())
    ref = Linear4bit.from_linear(lin, block_size=128)
    assert torch.equal(q.weight, ref.weight) and q.quant_state.block_size == 128
    assert torch.equal(q.dequantized_weight(), ref.dequantized_weight())
    assert q.bias is not None and torch.equal(q.bias, lin.bias)


def test_quantize_model_skips_and_reports() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(100, 64)
            self.proj = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 100, bias=False)

    m = Tiny().to(torch.bfloat16)
    quantize_model(m)
    assert isinstance(m.proj, Linear4bit) and type(m.lm_head) is nn.Linear
    rep = model_storage_report(m)
    assert rep["nf4_packed"] == 64 * 64 // 2
    assert rep["params_4bit"] == 64 * 64
    # bf16: embedding + lm_head + the proj bias (kept in its dtype)
    assert rep["bfloat16"] == 2 * (100 * 64 + 64 * 100 + 64)
    s = m.proj.quant_state
    assert s.nested_absmax is not None and s.nested_code is not None and s.offset is not None
    stats = sum(
        t.numel() * t.element_size() for t in (s.absmax, s.code, s.nested_absmax, s.nested_code, s.offset)
    )
    assert rep["quant_stats"] == stats
    assert rep["total"] == rep["nf4_packed"] + rep["quant_stats"] + rep["bfloat16"]


def test_loads_transformers_bitsandbytes_checkpoint(llama_factory) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint quantized by transformers+bitsandbytes (CPU) loads into quantize_model's
    layers; logits match bitsandbytes' own model, and our state dict equals theirs."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = llama_factory()
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        cfg = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        ref = AutoModelForCausalLM.from_pretrained(
            d, quantization_config=cfg, device_map="cpu", dtype=torch.float32
        )
    bnb_fp32_reference(ref.eval())
    ref_sd = ref.state_dict()

    ours = llama_factory()
    quantize_model(ours, compute_dtype=torch.float32)
    missing, unexpected = ours.load_state_dict(ref_sd, strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    # Our own quantization of the same fp32 weights: packed codes identical to bnb's.
    ours2 = llama_factory()
    quantize_model(ours2, compute_dtype=torch.float32)
    sd2 = ours2.state_dict()
    assert set(sd2) == set(ref_sd)
    for k, v in ref_sd.items():
        if k.endswith(".weight") and v.dtype == torch.uint8:
            assert torch.equal(sd2[k], v), k
