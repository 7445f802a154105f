"""AdamW with 8-bit blockwise optimizer states, in pure PyTorch (Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization"; QLoRA §3 uses them for its adapters).

Follows bitsandbytes' ``AdamW8bit`` (0.50.2), CPU path ``backends/cpu/ops.py
_optimizer_update_8bit_blockwise_cpu``:

* tensors with fewer than ``min_8bit_size`` (4096) elements keep fp32 states and use the 32-bit
  update (``_optimizer_update_32bit_cpu``);
* larger ones store m (first moment) as uint8 codes of the signed dynamic map and v (second
  moment) as uint8 codes of the unsigned dynamic map, each with one fp32 absmax per 256 values;
* each step: dequantize both states to fp32, run the AdamW update in fp32, requantize.

Requantization picks the exact nearest code (bitsandbytes' CPU C++ kernel uses a lookup table
that is off by one code on a small fraction of values; its CUDA kernel is exact).

``PagedAdamW``: paging (optimizer state spilling to CPU memory under GPU pressure) is a CUDA
unified-memory feature; on CUDA with bitsandbytes installed we hand over to its paged
optimizers, elsewhere we warn and return a non-paged optimizer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .blockwise8 import create_dynamic_map, dequantize_blockwise_8bit, quantize_blockwise_8bit

__all__ = ["AdamW8bit", "PagedAdamW", "optimizer_state_bytes"]

STATE_BLOCK = 256  # bitsandbytes' block size for 8-bit optimizer states


class AdamW8bit(torch.optim.Optimizer):
    """AdamW whose moments live in 8 bits (blockwise dynamic quantization).

    Per-parameter state: ``step`` (int), ``state1``/``state2`` (uint8 codes, same shape as the
    parameter, or fp32 moments for small tensors) and ``absmax1``/``absmax2`` ((ceil(n/256),)
    fp32) for quantized ones — the names bitsandbytes uses.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        min_8bit_size: int = 4096,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size

    def _init_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        if p.numel() < self.min_8bit_size:
            state["state1"] = torch.zeros_like(p, dtype=torch.float32)
            state["state2"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            blocks = -(-p.numel() // STATE_BLOCK)
            state["state1"] = torch.zeros_like(p, dtype=torch.uint8)
            state["state2"] = torch.zeros_like(p, dtype=torch.uint8)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p] if self.state[p] else self._init_state(p)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.float().contiguous()
                p32 = p.float().contiguous()  # the parameter itself when it is fp32 and contiguous
                c1 = 1.0 - beta1**t
                c2 = math.sqrt(1.0 - beta2**t)
                if state["state1"].dtype == torch.uint8:
                    dyn, udyn = _maps(p.device)
                    m = dequantize_blockwise_8bit(state["state1"], state["absmax1"], dyn, STATE_BLOCK)
                    v = dequantize_blockwise_8bit(state["state2"], state["absmax2"], udyn, STATE_BLOCK)
                    m.mul_(beta1).add_(grad.view(-1), alpha=1.0 - beta1)
                    v.mul_(beta2).addcmul_(grad.view(-1), grad.view(-1), value=1.0 - beta2)
                    # bnb's 8-bit form: p -= lr/c1 * m / (sqrt(v)/c2 + eps)
                    denom = (v.sqrt() / c2).add_(eps)
                    if wd > 0.0:
                        p32.mul_(1.0 - lr * wd)
                    p32.view(-1).addcdiv_(m, denom, value=-lr / c1)
                    q1, a1 = quantize_blockwise_8bit(m, dyn, STATE_BLOCK)
                    q2, a2 = quantize_blockwise_8bit(v, udyn, STATE_BLOCK)
                    state["state1"].view(-1).copy_(q1)
                    state["state2"].view(-1).copy_(q2)
                    state["absmax1"].copy_(a1)
                    state["absmax2"].copy_(a2)
                else:
                    m, v = state["state1"], state["state2"]
                    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                    # bnb's 32-bit form: p += (-lr*c2/c1) * m / (sqrt(v) + eps*c2)
                    if wd > 0.0:
                        p32.mul_(1.0 - lr * wd)
                    update = m / (v.sqrt() + eps * c2)
                    p32.add_(update, alpha=-lr * c2 / c1)
                if p32 is not p:
                    p.copy_(p32)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but the uint8 codes and fp32 absmax/moments keep their dtypes (torch
        casts floating state to the parameter dtype, which would turn codes into floats and
        round fp32 moments to bf16)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        raw = {i: dict(s) for i, s in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        for i, p in zip(saved_ids, params):
            for key, val in raw.get(i, {}).items():
                if isinstance(val, Tensor) and key != "step":
                    self.state[p][key] = val.to(p.device).clone()


def _maps(device: torch.device) -> tuple[Tensor, Tensor]:
    """(signed dynamic map for m, unsigned dynamic map for v), both (256,) fp32."""
    return create_dynamic_map(True).to(device), create_dynamic_map(False).to(device)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of tensor state held by ``opt`` (moments, codes, absmax; ``step`` counters excluded)."""
    total = 0
    for st in opt.state.values():
        for key, val in st.items():
            if isinstance(val, Tensor) and key != "step":
                total += val.numel() * val.element_size()
    return total


def PagedAdamW(  # noqa: N802 - reads as the class it stands for
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    optim_bits: int = 32,
) -> torch.optim.Optimizer:
    """Paged AdamW: bitsandbytes' ``PagedAdamW``/``PagedAdamW8bit`` for CUDA parameters.

    Paging needs CUDA unified memory.  For CPU parameters (or without bitsandbytes) this warns
    and returns the non-paged equivalent: :class:`AdamW8bit` (``optim_bits=8``) or
    ``torch.optim.AdamW``.
    """
    if optim_bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
    param_list: list[Any] = list(params)
    flat = [p for g in param_list for p in (g["params"] if isinstance(g, dict) else [g])]
    on_cuda = bool(flat) and all(isinstance(p, Tensor) and p.is_cuda for p in flat)
    if on_cuda:
        try:
            import bitsandbytes as bnb  # optional; only for CUDA paging
        except ImportError:
            warnings.warn("PagedAdamW: bitsandbytes is not installed; paging disabled", stacklevel=2)
        else:
            cls = bnb.optim.PagedAdamW8bit if optim_bits == 8 else bnb.optim.PagedAdamW
            return cls(param_list, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)  # type: ignore[no-any-return]
    else:
        warnings.warn(
            "PagedAdamW: paging applies only to CUDA memory; these parameters are not on CUDA, "
            "so a non-paged optimizer is used",
            stacklevel=2,
        )
    if optim_bits == 8:
        return AdamW8bit(param_list, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(param_list, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
