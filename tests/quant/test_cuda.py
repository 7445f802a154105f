"""CUDA paths of the QLoRA stack.  Marked ``gpu``: outside the default run, run with ``-m gpu``
on a machine with CUDA (each test skips without it).

Oracles as on CPU: our own CPU results (bytes and bits must not depend on the device), the naive
formula, and bitsandbytes' CUDA kernels, whose nested (double-quant) codes are exact nearest
codes, so every byte must match there.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from deltatune.quant import AdamW8bit, PagedAdamW, quantize_model
from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_quantize_dequantize_equal_cpu(quant_type: str) -> None:
    torch.manual_seed(0)
    for bs, shape in ((64, (512, 768)), (32, (33, 17)), (4096, (3, 4096 + 5))):
        for dtype in DTYPES:
            w = (torch.randn(shape) * 0.05).to(dtype)
            p_cpu, s_cpu = quantize_4bit(w, bs, double_quant=True, quant_type=quant_type)
            p_gpu, s_gpu = quantize_4bit(w.cuda(), bs, double_quant=True, quant_type=quant_type)
            assert p_gpu.is_cuda and torch.equal(p_gpu.cpu(), p_cpu), (bs, shape, dtype)
            assert torch.equal(s_gpu.absmax.cpu(), s_cpu.absmax)
            for out in DTYPES:
                d_gpu = dequantize_4bit(p_gpu, s_gpu, out)
                assert d_gpu.is_cuda
                assert torch.equal(_bits(d_gpu.cpu()), _bits(dequantize_4bit(p_cpu, s_cpu, out))), (bs, out)


def test_cuda_bytes_equal_bitsandbytes_cuda() -> None:
    bnbf = pytest.importorskip("bitsandbytes.functional")
    torch.manual_seed(1)
    for dtype in DTYPES:
        w = (torch.randn(1024, 1536, device="cuda") * 0.02).to(dtype)
        ref_p, ref_s = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        p, s = quantize_4bit(w, 64, double_quant=True)
        assert torch.equal(p.view(-1), ref_p.view(-1)), dtype
        assert torch.equal(s.absmax, ref_s.absmax), dtype  # nested codes: exact on CUDA
        assert torch.equal(_bits(s.nested_absmax), _bits(ref_s.state2.absmax)), dtype  # type: ignore[arg-type]
        assert torch.equal(_bits(dequantize_4bit(p, s)), _bits(bnbf.dequantize_4bit(ref_p, ref_s))), dtype


def test_cuda_qlora_forward_backward_equal_lora_on_dequantized(llama_factory: Any) -> None:
    """bf16 on CUDA: the 4-bit model with LoRA gives LoRA-on-dequantized outputs and gradients."""
    import deltatune

    torch.manual_seed(2)
    q = quantize_model(llama_factory(), compute_dtype=torch.bfloat16).cuda()
    ref = llama_factory().cuda()
    with torch.no_grad():  # the reference holds exactly the dequantized weights
        for name, mod in q.named_modules():
            if hasattr(mod, "dequantized_weight"):
                ref.get_submodule(name).weight.copy_(mod.dequantized_weight(torch.float32))
    cfg = deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    for m in (q, ref):
        deltatune.inject(m, cfg)
    with torch.no_grad():  # non-zero B so the adapter contributes
        for (_, a), (_, b) in zip(q.named_parameters(), ref.named_parameters()):
            if a.requires_grad:
                a.normal_(0, 0.05)
                b.copy_(a)
    ids = torch.randint(4, 250, (2, 16), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lq = q(ids, labels=ids).loss
        lr = ref(ids, labels=ids).loss
    lq.backward()
    lr.backward()
    torch.testing.assert_close(lq, lr, rtol=2e-2, atol=2e-2)
    for (n, a), (_, b) in zip(q.named_parameters(), ref.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-3, msg=n)
    assert all(not p.requires_grad for n, p in q.named_parameters() if "lora_" not in n)


def test_paged_adamw_delegates_to_bitsandbytes_on_cuda() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.randn(4096, 64, device="cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "paging does not apply" warning on CUDA
        opt = PagedAdamW([p], lr=1e-3, optim_bits=8)
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    opt.step()
    assert not torch.equal(before, p.detach())


def test_adamw8bit_on_cuda_matches_cpu() -> None:
    torch.manual_seed(3)
    w = torch.randn(8192)
    grads = [torch.randn(8192) for _ in range(5)]
    results = []
    for dev in ("cpu", "cuda"):
        p = torch.nn.Parameter(w.clone().to(dev))
        opt = AdamW8bit([p], lr=1e-2)
        for g in grads:
            p.grad = g.to(dev)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_cli_qlora_trains_on_cuda(model_dir: Any, tmp_path: Any) -> None:
    from deltatune.cli import main

    out = tmp_path / "run"
    rc = main([
        "train", "--set", f"model.spec={model_dir}", "--set", "model.device=cuda", "--set", "method=qlora",
        "--set", "train.max_steps=3", "--set", "eval.before=false", "--set", f"output_dir={out}",
    ])  # fmt: skip
    assert rc == 0 and (out / "adapter" / "adapter_model.safetensors").exists()
