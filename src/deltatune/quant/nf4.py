"""NF4 / FP4 blockwise 4-bit quantization in pure PyTorch, byte-identical to bitsandbytes.

QLoRA (Dettmers et al. 2023, §2 "4-bit NormalFloat", §3 "Double Quantization") stores a frozen
weight as 4-bit codes, one fp32 ``absmax`` per block of ``block_size`` values, and optionally
quantizes those absmax values again to 8 bits ("double quantization").

Reference semantics (bitsandbytes 0.50.2, the version this file was checked against):

* codebooks: ``bitsandbytes.functional.get_4bit_type`` (copied below, float32 values);
* 4-bit quantize: the pure-PyTorch reference kernel ``bitsandbytes/backends/default/ops.py``
  (``bitsandbytes::quantize_4bit``), which is the kernel bitsandbytes runs on CPU:
  full blocks use ``x * (1 / absmax)``, the ragged last block uses ``x / absmax``; the index is
  ``torch.bucketize`` on the fp32 midpoints of the sorted codebook, i.e. the number of
  midpoints strictly below the scaled value (an exact tie goes to the lower code);
  two codes per byte, the first element in the high nibble; an odd tail is padded with 0;
* 4-bit dequantize: ``code[q] * absmax`` in fp32, then cast to the output dtype;
* double quantization (``quantize_4bit(..., compress_statistics=True)``): subtract the fp32
  mean of the absmax vector, then 8-bit blockwise quantization with ``create_dynamic_map()``
  in blocks of 256.  We pick the exact nearest dynamic code (as bnb's CUDA kernel and its
  pure-PyTorch reference do); bnb's CPU C++ kernel rounds through a lookup table and differs
  on a small fraction of nested codes (measured in tests/quant/test_nf4.py);
* checkpoint layout: ``bitsandbytes.functional.QuantState.as_dict(packed=True)`` /
  ``from_dict``, the layout transformers writes for ``load_in_4bit`` models.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from . import _native
from .blockwise8 import create_dynamic_map, dequantize_blockwise_8bit, quantize_blockwise_8bit

__all__ = [
    "NF4_CODE",
    "FP4_CODE_RAW",
    "QuantState4bit",
    "create_dynamic_map",
    "get_4bit_code",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_fp4",
    "dequantize_fp4",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
    "storage_bits_per_param",
]

# NF4 levels, copied verbatim from bitsandbytes 0.50.2 `functional.get_4bit_type("nf4")`
# (generated there by `create_normal_map(offset=0.9677083, use_extra_value=True)`):
# 7 negative levels, an exact 0, 8 positive levels; sorted ascending.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (e2m1, bias 2) in bit-pattern order, copied from the same function; bitsandbytes divides
# the table by its absmax (12.0) in float32.  Note `-0` is the Python int 0, i.e. +0.0.
FP4_CODE_RAW: tuple[float, ...] = (
    0,
    0.0625,
    8.0,
    12.0,
    4.0,
    6.0,
    2.0,
    3.0,
    -0,
    -0.0625,
    -8.0,
    -12.0,
    -4.0,
    -6.0,
    -2.0,
    -3.0,
)

VALID_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # bitsandbytes quantizes absmax in blocks of 256 (quantize_4bit)
_CHUNK = 1 << 18  # elements per inner step: the fp32 temporaries of one step stay in L2/L3

_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child makes its own


def _for_chunks(fn: Callable[[int, int], None], total: int, step: int, on_cpu: bool) -> None:
    """Call ``fn(start, stop)`` for consecutive ranges of ``[0, total)``, each ``step`` long.

    On CPU with several torch threads, the ranges run on a Python thread pool while torch ops
    run single-threaded: our per-chunk ops are small, and intra-op parallelism pays one thread
    synchronisation per op — on a busy machine a descheduled worker stalls each of them
    (measured, 2 cores under load: NF4 dequantize of 4096x4096 in 52 ms this way vs 765 ms
    with intra-op threads).  torch.set_num_threads is process-wide, so it is restored at once.
    """
    global _pool
    ranges = [(a, min(a + step, total)) for a in range(0, total, step)]
    n_threads = torch.get_num_threads()
    if not on_cpu or n_threads <= 1 or len(ranges) < 2:
        for a, b in ranges:
            fn(a, b)
        return
    if _pool is None or _pool[0] != os.getpid() or _pool[1]._max_workers != n_threads:
        _pool = (os.getpid(), ThreadPoolExecutor(n_threads, thread_name_prefix="deltatune-quant"))
    # Inference mode is thread-local: a worker must be in it exactly when the caller is, or it may
    # not write into the caller's (inference) output tensor.
    inference = torch.is_inference_mode_enabled()

    def run(r: tuple[int, int]) -> None:
        with torch.inference_mode(inference):
            fn(*r)

    torch.set_num_threads(1)
    try:
        for _ in _pool[1].map(run, ranges):
            pass
    finally:
        torch.set_num_threads(n_threads)


@cache
def get_4bit_code(quant_type: str) -> Tensor:
    """The 16-entry fp32 codebook of ``quant_type`` ("nf4" or "fp4"), indexed by 4-bit code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_CODE, dtype=torch.float32)
    if quant_type == "fp4":
        data = torch.tensor(FP4_CODE_RAW, dtype=torch.float32)
        return data.div_(data.abs().max())  # same fp32 division as bitsandbytes
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


# ----------------------------------------------------------------------------------------------
# Exact nearest-level search without a binary search.
#
# torch.bucketize costs ~50 ns/element on this class of CPU (branchy binary search).  We split
# [-1, 1] into K equal cells, chosen so that every cell holds at most one codebook midpoint and
# no midpoint lies within `margin` of a cell edge.  Then for s in cell c:
#     #(midpoints < s) = base[c] + (s > thr[c])
# where base[c] counts the midpoints below the cell and thr[c] is the cell's midpoint (+inf if
# none).  The fp32 rounding in computing c moves s at most a few ulps (~1e-7) across an edge,
# and because no midpoint is that close to an edge the count is still exact.  Ties (s equal to
# a midpoint) compare false, i.e. go to the lower code, exactly like bucketize(right=False).
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grid:
    half: float  # K / 2: cell = trunc(s * K/2 + K/2)
    base: Tensor  # (K + 1,) int32 bucket count below each cell (or final code for fp4)
    thr: Tensor  # (K + 1,) fp32 midpoint inside each cell, +inf when none
    step: Tensor  # (K + 1,) int32 code increment when s > thr (1 for sorted codes)
    sorted_codes: bool  # nf4: bucket index == code, so the step table is not needed


def _find_grid(mids: list[float], margin: float = 1e-5) -> int:
    for k in range(16, 1 << 15):
        edges_ok = True
        counts: dict[int, int] = {}
        for m in mids:
            t = (m + 1.0) * k / 2.0
            c = math.floor(t)
            if t - c < margin * k or c + 1 - t < margin * k:
                edges_ok = False
                break
            counts[c] = counts.get(c, 0) + 1
        if edges_ok and max(counts.values()) <= 1:
            return k
    raise RuntimeError("no grid found")  # pragma: no cover - codebooks are fixed


@cache
def _grid(quant_type: str) -> _Grid:
    code = get_4bit_code(quant_type)
    order = torch.argsort(code)  # same call as bitsandbytes: identity for nf4, a remap for fp4
    srt = code[order]
    mids_t = (srt[:-1] + srt[1:]) / 2  # fp32 midpoints, identical to bnb's `bounds`
    mids = mids_t.tolist()
    k = _find_grid(mids)
    base = torch.zeros(k + 1, dtype=torch.int64)
    thr = torch.full((k + 1,), math.inf, dtype=torch.float32)
    for i, m in enumerate(mids):
        c = math.floor((m + 1.0) * k / 2.0)
        base[c + 1 :] += 1
        thr[c] = mids_t[i]
    # Map bucket -> code index (fp4 codes are not sorted); step = code(bucket+1) - code(bucket).
    order_ext = torch.cat([order, order[-1:]])
    lo = order_ext[base]
    hi = order_ext[(base + 1).clamp(max=15)]
    step = (hi - lo).to(torch.int32)
    is_sorted = bool(torch.equal(order, torch.arange(16)))
    return _Grid(half=k / 2.0, base=lo.to(torch.int32), thr=thr, step=step, sorted_codes=is_sorted)


@cache
def _grid_on(quant_type: str, device: str) -> _Grid:
    """The cell tables of :func:`_grid` on ``device`` (cached: no host copies per chunk)."""
    g = _grid(quant_type)
    if device == "cpu":
        return g
    return _Grid(g.half, g.base.to(device), g.thr.to(device), g.step.to(device), g.sorted_codes)


def _codes_of_scaled(s: Tensor, grid: _Grid, out: Tensor) -> None:
    """Write into int32 ``out`` the 4-bit code of each fp32 value in ``s`` (both (m,))."""
    cell = torch.mul(s, grid.half).add_(grid.half).to(torch.int32)  # trunc toward 0; s ≥ -1-ε
    torch.index_select(grid.base, 0, cell, out=out)
    thr = grid.thr.index_select(0, cell)
    above = torch.gt(s, thr)
    if grid.sorted_codes:
        out.add_(above)
    else:
        out.add_(grid.step.index_select(0, cell).mul_(above))


# ----------------------------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------------------------
@dataclass
class QuantState4bit:
    """Everything needed to undo a 4-bit quantization (mirrors bitsandbytes ``QuantState``).

    absmax: (n_blocks,) fp32, or (n_blocks,) uint8 dynamic codes when double-quantized.
    code: (16,) fp32 4-bit codebook ("quant_map").
    nested_absmax: (ceil(n_blocks / 256),) fp32 scale of the absmax codes.
    nested_code: (256,) fp32 dynamic map ("nested_quant_map").
    offset: 0-d fp32 mean subtracted from absmax before the 8-bit quantization.
    """

    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    quant_type: str
    code: Tensor
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    offset: Tensor | None = None
    nested_block_size: int = NESTED_BLOCK_SIZE

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def block_absmax(self) -> Tensor:
        """(n_blocks,) fp32 absmax, undoing double quantization exactly as bitsandbytes does."""
        if not self.nested:
            return self.absmax.float()
        assert self.nested_absmax is not None and self.nested_code is not None and self.offset is not None
        absmax = dequantize_blockwise_8bit(
            self.absmax, self.nested_absmax, self.nested_code, self.nested_block_size
        )
        return absmax.add_(self.offset)

    def to(self, device: torch.device | str) -> QuantState4bit:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return QuantState4bit(
            absmax=self.absmax.to(device),
            shape=self.shape,
            dtype=self.dtype,
            block_size=self.block_size,
            quant_type=self.quant_type,
            code=self.code.to(device),
            nested_absmax=mv(self.nested_absmax),
            nested_code=mv(self.nested_code),
            offset=mv(self.offset),
            nested_block_size=self.nested_block_size,
        )

    # -- checkpoint layout: bitsandbytes QuantState.as_dict(packed=True) / from_dict ----------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors keyed as bitsandbytes writes them after ``<module>.weight.``.

        Keys: absmax, quant_map, [nested_absmax, nested_quant_map,]
        quant_state.bitsandbytes__<quant_type> (uint8 bytes of a JSON object).
        """
        meta: dict[str, object] = {
            "quant_type": self.quant_type,
            "blocksize": self.block_size,
            "dtype": _dtype_name(self.dtype),
            "shape": list(self.shape),
        }
        out: dict[str, Tensor] = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested:
            assert self.nested_code is not None and self.offset is not None and self.nested_absmax is not None
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code.clone()  # unshared, as bnb (safetensors)
            meta.update(
                {
                    "nested_blocksize": self.nested_block_size,
                    "nested_dtype": "float32",
                    "nested_offset": self.offset.item(),
                }
            )
        # json.dumps with default separators: the same bytes bitsandbytes' pack_dict_to_tensor writes.
        raw = json.dumps(meta).encode("utf-8")
        out["quant_state.bitsandbytes__" + self.quant_type] = torch.frombuffer(
            bytearray(raw), dtype=torch.uint8
        )
        return out

    @classmethod
    def from_state_dict(
        cls, tensors: dict[str, Tensor], device: torch.device | str | None = None
    ) -> QuantState4bit:
        """Inverse of :meth:`state_dict`; keys may carry any prefix (``...weight.absmax``)."""
        by_leaf: dict[str, Tensor] = {}
        meta: dict[str, object] | None = None
        for key, val in tensors.items():
            if "quant_state.bitsandbytes__" in key:
                meta = json.loads(bytes(val.cpu().to(torch.uint8).numpy()).decode("utf-8"))
            else:
                by_leaf[key.split(".")[-1]] = val
        if meta is None:
            raise ValueError("missing 'quant_state.bitsandbytes__nf4|fp4' entry")
        dev = device if device is not None else by_leaf["absmax"].device
        nested = "nested_absmax" in by_leaf
        shape = meta["shape"]
        assert isinstance(shape, list)
        nested_bs = meta.get("nested_blocksize", NESTED_BLOCK_SIZE)
        block_size = meta["blocksize"]
        assert isinstance(nested_bs, int) and isinstance(block_size, int)
        return cls(
            absmax=by_leaf["absmax"].to(dev),
            shape=torch.Size(shape),
            dtype=getattr(torch, str(meta["dtype"])),
            block_size=block_size,
            quant_type=str(meta["quant_type"]),
            code=by_leaf["quant_map"].to(dev),
            nested_absmax=by_leaf["nested_absmax"].to(dev) if nested else None,
            nested_code=by_leaf["nested_quant_map"].to(dev) if nested else None,
            offset=torch.tensor(float(str(meta["nested_offset"])), device=dev) if nested else None,
            nested_block_size=nested_bs,
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# 4-bit quantize
# ----------------------------------------------------------------------------------------------
def quantize_4bit(
    weight: Tensor, block_size: int = 64, double_quant: bool = True, quant_type: str = "nf4"
) -> tuple[Tensor, QuantState4bit]:
    """Quantize ``weight`` (any shape, fp32/bf16/fp16) to packed 4-bit codes.

    Returns ``packed``: (ceil(numel/2), 1) uint8 (bitsandbytes' Params4bit layout, first element
    in the high nibble) and the :class:`QuantState4bit` needed to dequantize.
    """
    if block_size not in VALID_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {VALID_BLOCK_SIZES}, got {block_size}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"4-bit quantization needs fp32/bf16/fp16 input, got {weight.dtype}")
    grid = _grid_on(quant_type, str(weight.device))
    flat = weight.detach().reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // block_size)
    full = (n // block_size) * block_size
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=flat.device)
    codes = torch.empty(n + (n & 1), dtype=torch.int32, device=flat.device)  # even length

    # Full blocks, in chunks of whole blocks so the fp32 temporaries stay in cache.
    def chunk(start: int, stop: int) -> None:
        xb = flat[start:stop].view(-1, block_size)  # (nb, bs) in the input dtype
        # absmax = max(|min|, |max|), exact in any float dtype; abs_() turns -0.0 into +0.0 as
        # bnb's abs().max() does for an all-zero block.
        mn, mx = torch.aminmax(xb, dim=1)
        am = torch.maximum(mn.neg(), mx).float().abs_()
        if not bool(torch.isfinite(am).all()):  # NaN/Inf would index outside the cell tables
            raise ValueError("cannot quantize a weight with NaN or Inf values")
        absmax[start // block_size : stop // block_size] = am
        # s = x * (1/absmax) in fp32 (bf16/fp16 promote exactly); never touches `weight`.
        s = torch.mul(xb, (1.0 / am.clamp(min=1e-38)).unsqueeze(1)).view(-1)
        _codes_of_scaled(s, grid, codes[start:stop])

    step = max(block_size, (_CHUNK // block_size) * block_size)
    _for_chunks(chunk, full, step, flat.device.type == "cpu")
    if full < n:  # ragged last block: bnb divides by its (clamped) absmax instead of multiplying
        tail = flat[full:].float()
        am_t = tail.abs().max().clamp(min=1e-38)
        if not bool(torch.isfinite(am_t)):
            raise ValueError("cannot quantize a weight with NaN or Inf values")
        absmax[-1] = am_t
        _codes_of_scaled(tail / am_t, grid, codes[full:n])
    if n & 1:  # bnb pads the scaled vector with one 0 before packing
        _codes_of_scaled(torch.zeros(1, device=flat.device), grid, codes[n:])

    # Pack: code pairs (a, b) -> (a << 4) | b, the first element in the high nibble.
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] * 16).add_(pairs[:, 1]).to(torch.uint8).unsqueeze(1)

    code = get_4bit_code(quant_type).to(flat.device)
    if not double_quant:
        return packed, QuantState4bit(
            absmax, weight.shape, weight.dtype, block_size, quant_type, code.clone()
        )
    offset = absmax.mean()
    dyn = create_dynamic_map(True).to(flat.device)
    qabs, nested_absmax = quantize_blockwise_8bit(absmax - offset, dyn, NESTED_BLOCK_SIZE)
    state = QuantState4bit(
        absmax=qabs,
        shape=weight.shape,
        dtype=weight.dtype,
        block_size=block_size,
        quant_type=quant_type,
        code=code.clone(),
        nested_absmax=nested_absmax,
        nested_code=dyn.clone(),
        offset=offset,
    )
    return packed, state


# ----------------------------------------------------------------------------------------------
# 4-bit dequantize
# ----------------------------------------------------------------------------------------------
@cache
def _dequant_code(quant_type: str) -> Tensor:
    """(16,) fp32 values the dequantize kernels produce for each code.

    Equal to the codebook except FP4 code 0b1000, which bitsandbytes' C++ CPU and CUDA kernels
    decode from its sign bit as -0.0 (the quant_map tensor, and bnb's pure-PyTorch fallback
    used for odd last dimensions, hold +0.0).  We follow the kernels; -0.0 == +0.0 in value.
    """
    code = get_4bit_code(quant_type).clone()
    if quant_type == "fp4":
        code[8] = -0.0
    return code


@cache
def _quad_lut(quant_type: str) -> Tensor:
    """(65536,) complex128 = 4 fp32 code values for each 16-bit word of two packed bytes.

    A little-endian int16 word w holds byte0 = w & 255 (elements 0, 1) and byte1 = w >> 8
    (elements 2, 3); one index_select then yields four outputs (16 bytes) per lookup.
    """
    code = _dequant_code(quant_type)
    b = torch.arange(256)
    pair = torch.stack([code[b >> 4], code[b & 15]], 1)  # (256, 2): high nibble first
    w = torch.arange(65536)
    quad = torch.cat([pair[w & 255], pair[w >> 8]], 1).contiguous()  # (65536, 4) fp32
    return quad.view(torch.complex128).view(-1)


def dequantize_4bit(packed: Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> Tensor:
    """Packed codes + state -> tensor of ``state.shape`` in ``dtype`` (default: original dtype).

    Each value is ``code[q] * absmax`` rounded once to fp32, then cast to ``dtype`` — the exact
    bitsandbytes arithmetic, so fp32 results are bit-identical and bf16/fp16 ones are the
    correctly rounded casts of those.
    """
    out_dtype = dtype or state.dtype
    n = state.numel
    bs = state.block_size
    pk = packed.reshape(-1)
    if pk.dtype != torch.uint8:
        pk = pk.view(torch.uint8)
    out = torch.empty(n, dtype=out_dtype, device=pk.device)
    full = (n // bs) * bs  # bs ≥ 32, so `full` is a multiple of 4 elements = 2 bytes
    kernel = _native.dequant_kernel() if pk.device.type == "cpu" and out_dtype in _native.KINDS else None
    if kernel is not None and n == full:
        # Everything, the absmax included, in one native pass: no temporaries (measured: a 1 MB
        # absmax temporary alone made glibc return and re-fault the 32 MB output, +4 ms).
        _dequant_cpu_native(kernel, pk, state, out)
        return out.view(state.shape)
    absmax = state.block_absmax()  # (n_blocks,) fp32
    if full and kernel is not None:
        _dequant_cpu_native(kernel, pk[: full // 2], state, out[:full], absmax)
    elif full and pk.device.type == "cpu":
        _dequant_cpu_full(pk[: full // 2], absmax, state.quant_type, bs, out[:full])
    elif full:
        code = _dequant_code(state.quant_type).to(pk.device)
        _dequant_simple(pk[: full // 2], absmax[: full // bs], code, bs, out[:full])
    if full < n:
        lo = full // 2
        code = _dequant_code(state.quant_type).to(pk.device)
        nib = torch.stack([pk[lo:] >> 4, pk[lo:] & 15], 1).view(-1)[: n - full]
        out[full:] = code[nib.long()].mul_(absmax[-1])
    return out.view(state.shape)


def _dequant_simple(pk: Tensor, absmax: Tensor, code: Tensor, bs: int, out: Tensor) -> None:
    """Device-agnostic path: (m/2,) bytes -> out (m,), m a multiple of bs."""
    nib = torch.stack([pk >> 4, pk & 15], 1).view(-1).long()
    vals = code[nib].view(-1, bs).mul_(absmax.unsqueeze(1))
    out.copy_(vals.view(-1))


def _dequant_cpu_native(
    kernel: Callable[..., int], pk: Tensor, state: QuantState4bit, out: Tensor, absmax: Tensor | None = None
) -> None:
    """Whole blocks through the native kernel (see ``_native``): pk (m/2,) uint8 -> out (m,).

    Undoes double quantization itself unless ``absmax`` (fp32, already undone) is given.  The
    kernel splits the work over torch's thread count (pthreads, GIL released): a Python pool's
    per-chunk hand-off cost more than the kernel's ~1.7 ms on 16M outputs.
    """
    # Locals keep every tensor alive until the call returns; the kernel only sees pointers.
    code, pk = _dequant_code(state.quant_type), pk.contiguous()
    nested_code: Tensor | None = None
    nested_absmax: Tensor | None = None
    offset, nested_bs = 0.0, 1
    if absmax is None and state.nested:
        assert state.nested_code is not None and state.nested_absmax is not None and state.offset is not None
        scales = state.absmax.contiguous()  # (n_blocks,) uint8 codes, undone in the kernel
        nested_code, nested_absmax = state.nested_code.float().contiguous(), state.nested_absmax.float().contiguous()
        offset, nested_bs = float(state.offset), state.nested_block_size
    else:
        scales = (state.absmax if absmax is None else absmax).float().contiguous()  # (n_blocks,) fp32
    bs = state.block_size
    rc = kernel(
        pk.data_ptr(), scales.data_ptr(),
        0 if nested_code is None else nested_code.data_ptr(),
        0 if nested_absmax is None else nested_absmax.data_ptr(), offset, nested_bs,
        code.data_ptr(), out.data_ptr(), out.numel() // bs, bs, _native.KINDS[out.dtype], torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"native 4-bit dequantize failed (code {rc}) for block size {bs}, {out.dtype}")


def _dequant_cpu_full(pk: Tensor, absmax: Tensor, quant_type: str, bs: int, out: Tensor) -> None:
    """CPU fast path over whole blocks: pk (m/2,) uint8, absmax (m/bs,) fp32, out (m,).

    Per chunk: bytes -> 16-bit words -> one 16-byte lookup per 4 outputs -> multiply by the
    block absmax in fp32 -> cast into `out`.  The chunk temporaries stay in L2.
    """
    lut = _quad_lut(quant_type)
    words = pk.view(torch.uint16)  # (m/4,) little-endian 16-bit words, copied to int32 unsigned
    direct = out.dtype == torch.float32

    def chunk(start: int, stop: int) -> None:
        idx = words[start // 4 : stop // 4].to(torch.int32)  # (k,) k = (stop - start) / 4
        v = lut.index_select(0, idx).view(torch.float32).view(-1, bs)  # (nb, bs) code values
        a = absmax[start // bs : stop // bs].unsqueeze(1)  # (nb, 1)
        o = out[start:stop].view(-1, bs)
        if direct:
            torch.mul(v, a, out=o)
        else:
            o.copy_(v.mul_(a))  # fp32 product, then one rounding to bf16/fp16

    _for_chunks(chunk, out.numel(), max(bs, (_CHUNK // bs) * bs), True)


# ----------------------------------------------------------------------------------------------
# Convenience names
# ----------------------------------------------------------------------------------------------
def quantize_nf4(
    weight: Tensor, block_size: int = 64, double_quant: bool = True
) -> tuple[Tensor, QuantState4bit]:
    """NF4 quantization; see :func:`quantize_4bit`."""
    return quantize_4bit(weight, block_size, double_quant, "nf4")


def quantize_fp4(
    weight: Tensor, block_size: int = 64, double_quant: bool = True
) -> tuple[Tensor, QuantState4bit]:
    """FP4 (e2m1) quantization; see :func:`quantize_4bit`."""
    return quantize_4bit(weight, block_size, double_quant, "fp4")


def dequantize_nf4(packed: Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> Tensor:
    """Inverse of :func:`quantize_nf4`; see :func:`dequantize_4bit`."""
    return dequantize_4bit(packed, state, dtype)


def dequantize_fp4(packed: Tensor, state: QuantState4bit, dtype: torch.dtype | None = None) -> Tensor:
    """Inverse of :func:`quantize_fp4`; see :func:`dequantize_4bit`."""
    return dequantize_4bit(packed, state, dtype)


def storage_bits_per_param(packed: Tensor, state: QuantState4bit) -> float:
    """Bits of stored tensor data per parameter: packed codes, absmax (8-bit codes when nested),
    nested absmax, offset and both code tables.  The JSON metadata entry (shape, dtype, block
    sizes: ~150 bytes per tensor) is bookkeeping, not data, and is not counted.
    """
    nbytes = packed.numel() * packed.element_size()
    tensors = [state.absmax, state.code, state.nested_absmax, state.nested_code, state.offset]
    nbytes += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return 8.0 * nbytes / state.numel
