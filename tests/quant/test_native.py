"""The native CPU dequantize kernel (quant/csrc/dequant4bit.c) against the pure-PyTorch path and
a naive formula written here; building, caching and falling back when no compiler works."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from deltatune.quant import _native, nf4
from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))
    _native.reset()
    yield tmp_path
    _native.reset()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _naive(packed: torch.Tensor, state: nf4.QuantState4bit, dtype: torch.dtype) -> torch.Tensor:
    """code[q] * absmax in fp32, element by element in block order, then one cast."""
    n, bs = state.numel, state.block_size
    pk = packed.reshape(-1)
    q = torch.stack([pk >> 4, pk & 15], 1).view(-1)[:n].long()
    scale = state.block_absmax().repeat_interleave(bs)[:n]
    return (nf4._dequant_code(state.quant_type)[q] * scale).to(dtype).view(state.shape)


def _torch_path(packed: torch.Tensor, state: nf4.QuantState4bit, dtype: torch.dtype,
                monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("DELTATUNE_NATIVE", "0")
        assert _native.dequant_kernel() is None
        return dequantize_4bit(packed, state, dtype)


@pytest.mark.skipif(shutil.which("cc") is None or sys.platform != "linux", reason="no C compiler")
def test_kernel_builds_where_a_compiler_exists(fresh_cache: Path) -> None:
    """A machine with `cc` must get the kernel: a C error must fail CI, not fall back quietly."""
    assert _native.dequant_kernel() is not None
    built = list(fresh_cache.glob("native/*/libdeltatune_quant.so"))
    assert len(built) == 1 and not list(fresh_cache.glob("native/*/*.tmp"))
    _native.reset()
    assert _native.dequant_kernel() is not None  # second load reuses the cached build
    assert list(fresh_cache.glob("native/*/libdeltatune_quant.so")) == built


ISA_LEVELS = {0: "portable C", 1: "SSSE3", 2: "AVX2", 3: "AVX-512"}  # deltatune_set_max_isa


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "plain"])
def test_native_equals_torch_path_and_naive_formula(quant_type: str, double_quant: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every code path of the kernel (each ISA level this CPU has; lower levels are forced), both
    thread counts, all output dtypes: the pure-PyTorch path's bits and the naive formula."""
    kernel = _native.dequant_kernel()
    if kernel is None:
        pytest.skip("native kernel unavailable (no C compiler)")
    torch.manual_seed(0)
    # block sizes: % 64 == 0 (AVX2 / AVX-512 paths) and 32 (SSSE3 only); shapes: ragged tails,
    # a single element, and > 2^20 outputs (the threaded split, with 2 threads below)
    cases = [(32, (96, 64)), (64, (33, 17)), (64, (1, 1)), (128, (7, 1023)), (4096, (3, 4096 + 5)),
             (64, (1024, 1100)), (256, (2048, 600))]
    threads_before = torch.get_num_threads()
    isa_before = kernel.set_max_isa(3)
    try:
        for bs, shape in cases:
            w = torch.randn(shape) * 0.05
            w.view(-1)[::97] = 0.0  # exact zeros: absmax-relative code 0 of NF4
            packed, state = quantize_4bit(w, bs, double_quant=double_quant, quant_type=quant_type)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                ref = _torch_path(packed, state, dtype, monkeypatch)
                assert torch.equal(ref, _naive(packed, state, dtype)), (bs, shape, dtype)
                for isa in ISA_LEVELS:
                    kernel.set_max_isa(isa)
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        ours = dequantize_4bit(packed, state, dtype)
                        assert torch.equal(_bits(ours), _bits(ref)), (ISA_LEVELS[isa], threads, bs, shape, dtype)
    finally:
        kernel.set_max_isa(isa_before)
        torch.set_num_threads(threads_before)


def test_fp16_rounding_edges_match_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp16 outputs around overflow, subnormals and ties: the kernel's rounding equals torch's."""
    if _native.dequant_kernel() is None:
        pytest.skip("native kernel unavailable (no C compiler)")
    torch.manual_seed(1)
    for scale in (70000.0, 65504.0, 1e-5, 6.1e-5, 3e-8, 1.0):
        w = torch.randn(64, 256) * scale
        packed, state = quantize_4bit(w, 64, double_quant=False)
        ours = dequantize_4bit(packed, state, torch.float16)
        ref = _naive(packed, state, torch.float16)
        assert torch.equal(_bits(ours), _bits(ref)), scale


def test_broken_compiler_falls_back_with_a_warning(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "false")  # exists, exits 1: a compile error
    with caplog.at_level(logging.WARNING, logger="deltatune.quant._native"):
        assert _native.dequant_kernel() is None
    assert "native 4-bit dequantize kernel unavailable" in caplog.text and "false failed" in caplog.text
    assert not list(fresh_cache.glob("native/*/*"))  # no half-written library left behind
    w = torch.randn(64, 128)
    packed, state = quantize_4bit(w, 64)
    assert torch.equal(dequantize_4bit(packed, state), _naive(packed, state, torch.float32))

    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    _native.reset()
    with caplog.at_level(logging.WARNING, logger="deltatune.quant._native"):
        assert _native.dequant_kernel() is None
    assert "no C compiler 'no-such-compiler-xyz' on PATH" in caplog.text


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_device_agnostic_path_equals_cpu_paths(quant_type: str) -> None:
    """`_dequant_simple` is what CUDA tensors run (no GPU here): on CPU tensors it must give the
    same bits as the CPU paths, so a GPU can only differ by its own arithmetic, not ours."""
    torch.manual_seed(5)
    for bs in (32, 64, 4096):
        w = torch.randn(64, 4096) * 0.05
        packed, state = quantize_4bit(w, bs, double_quant=True, quant_type=quant_type)
        code = nf4._dequant_code(quant_type)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            out = torch.empty(w.numel(), dtype=dtype)
            nf4._dequant_simple(packed.view(-1), state.block_absmax(), code, bs, out)
            ref = dequantize_4bit(packed, state, dtype)
            assert torch.equal(_bits(out.view(w.shape)), _bits(ref)), (bs, dtype)
