"""bitsandbytes' 8-bit dynamic code and blockwise 8-bit quantization (double quantization of the
4-bit absmax in ``nf4.py``, and the 8-bit optimizer states in ``optim8bit.py``)."""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor

__all__ = ["create_dynamic_map", "quantize_blockwise_8bit", "dequantize_blockwise_8bit"]


@cache
def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    """bitsandbytes' 8-bit dynamic tree code (Dettmers 2015), 256 sorted fp32 values.

    Same arithmetic as ``bitsandbytes.functional.create_dynamic_map`` (fp32 linspace, python
    float scaling, one final fp32 rounding) so the table is bit-identical.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def quantize_blockwise_8bit(x: Tensor, code: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Nearest-code 8-bit blockwise quantization of a flat fp32 tensor.

    x: (n,) float; code: (256,) sorted fp32.  Returns (q: (n,) uint8, absmax: (ceil(n/bs),) fp32).
    Semantics of bitsandbytes' reference kernel (backends/default/ops.py quantize_blockwise):
    full blocks scale by x * (1/absmax), the ragged block by x / absmax, absmax clamped at 1e-38
    for the division only (stored unclamped, except the ragged block which bnb stores clamped),
    index = bucketize on fp32 code midpoints (ties to the lower code).
    """
    flat = x.reshape(-1).float()
    n = flat.numel()
    rem = n % block_size
    full = n - rem
    com = flat[:full].view(-1, block_size)
    absmax = com.abs().amax(dim=1) if full else flat.new_empty(0)
    scaled = torch.clamp(com * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).view(-1)
    if rem:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8)
    return q, absmax


def dequantize_blockwise_8bit(q: Tensor, absmax: Tensor, code: Tensor, block_size: int) -> Tensor:
    """(n,) uint8 codes -> (n,) fp32 values ``code[q] * absmax[i // block_size]``."""
    flat = q.reshape(-1)
    n = flat.numel()
    vals = code.index_select(0, flat.to(torch.int32))
    full = n - n % block_size
    if full:
        vals[:full].view(-1, block_size).mul_(absmax[: full // block_size].unsqueeze(1))
    if full < n:
        vals[full:].mul_(absmax[full // block_size])
    return vals
