"""Data-dependent LoRA initialisations that move part of W₀ into the adapter: PiSSA and OLoRA.

PiSSA (Meng et al. 2024, §3): with W₀ = U S Vᵀ, the adapter starts as the principal part and the base
keeps the residual,
    A = √(S_r/s) V_rᵀ  (r, k)     B = U_r √(S_r/s)  (d, r)     so  s·BA = U_r S_r V_rᵀ
    W_res = W₀ − s·BA                                             (frozen base from now on)
``pissa_niter_K`` uses the randomized SVD (Halko et al.; ``torch.svd_lowrank`` with K subspace
iterations) instead of the full one, as PEFT does.
OLoRA (Büyükakyüz 2024, §3): W₀ = QR; B = Q[:, :r] (d, r), A = R[:r] (r, k), W_res = W₀ − s·BA.

Either way the layer's output is unchanged at the start: W_res + s·BA = W₀.

Saving (:func:`saved_factors`, :func:`saved_config`) writes an ordinary LoRA relative to the
*original* base — PEFT's ``path_initial_model_for_weight_conversion`` trick: the trained model is
W_res + s·BA = W₀ + s·(BA − B₀A₀), a rank-2r LoRA with
    A' = [A; A₀]  (2r, k)      B' = [B, −B₀]  (d, 2r)      α' = 2α (√2·α with rsLoRA), same s.
So the initial factors A₀, B₀ are kept on the layer (non-persistent buffers: not in state_dict).

All weights are handled in the (d, k) view (GPT-2 Conv1D stores Wᵀ).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable

import torch
from torch import nn

from .lora import INIT_SCHEMES, LoraLayer
from .lora_config import LoraConfig

__all__ = ["LAYER_INITS", "layer_init", "is_known", "check_targets", "initialise", "initial_factors",
           "saved_factors", "saved_config"]

_HOLDER = "lora_initial"


class _Initial(nn.Module):
    """A₀ (r, k) and B₀ (d, r) of one adapter, as buffers (they follow .to(), stay out of state_dict)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", a.detach().clone(), persistent=False)
        self.register_buffer("B", b.detach().clone(), persistent=False)


def _dk_weight(layer: LoraLayer) -> torch.Tensor:
    """W₀ as (d, k) fp32 (a copy)."""
    w = layer.base_weight()
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"PiSSA/OLoRA need a floating-point base weight (got {w.dtype}); initialise before quantizing")
    w = w.detach().to(torch.float32, copy=True)
    return w if layer.kind == "linear" else w.t()


def _install(layer: LoraLayer, name: str, a: torch.Tensor, b: torch.Tensor, residual: torch.Tensor) -> None:
    """Set A, B, write the residual (d, k) into the base weight, and keep A₀, B₀ for saving."""
    fa, fb = layer.factors(name)
    w = layer.base_weight()
    with torch.no_grad():
        fa.copy_(a)
        fb.copy_(b)
        w.copy_((residual if layer.kind == "linear" else residual.t()).to(w.dtype))
    if _HOLDER not in layer._modules:
        layer.add_module(_HOLDER, nn.ModuleDict())
    holder = layer.get_submodule(_HOLDER)
    assert isinstance(holder, nn.ModuleDict)
    holder[name] = _Initial(fa, fb)


def _pissa(layer: LoraLayer, name: str, niter: int | None = None) -> None:
    """PiSSA: top-r singular triplets into the adapter, the rest in the base. Same ops as PEFT's
    ``pissa_init`` so the factors agree bit for bit with the same SVD."""
    w = _dk_weight(layer)  # (d, k)
    r, s = layer.adapters[name].r, layer.adapters[name].scale
    if niter is None:
        u, sv, vh = torch.linalg.svd(w, full_matrices=False)  # (d, m), (m,), (m, k)
        ur, sr, vhr = u[:, :r], sv[:r] / s, vh[:r]
    else:
        ur, sr, v = torch.svd_lowrank(w, r, niter=niter)  # (d, r), (r,), (k, r)
        sr, vhr = sr / s, v.t()
    a = torch.diag(torch.sqrt(sr)) @ vhr  # (r, k)
    b = ur @ torch.diag(torch.sqrt(sr))  # (d, r)
    _install(layer, name, a, b, w - s * b @ a)


def _olora(layer: LoraLayer, name: str) -> None:
    """OLoRA: B = Q[:, :r] (orthonormal columns), A = R[:r]; as PEFT's ``olora_init``."""
    w = _dk_weight(layer)  # (d, k)
    r, s = layer.adapters[name].r, layer.adapters[name].scale
    q, rr = torch.linalg.qr(w)  # (d, m), (m, k)
    b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    _install(layer, name, a, b, w - s * b @ a)


#: Layer-level init schemes (they read W₀ and change it); A-only schemes are lora.INIT_SCHEMES.
LAYER_INITS: dict[str, Callable[..., None]] = {"pissa": _pissa, "olora": _olora}
_NITER = re.compile(r"pissa_niter_(\d+)")


def layer_init(init: str) -> Callable[[LoraLayer, str], None] | None:
    """The layer-level init function named ``init`` ('pissa', 'pissa_niter_K', 'olora'), or None."""
    m = _NITER.fullmatch(init)
    if m:
        return functools.partial(_pissa, niter=int(m.group(1)))
    return LAYER_INITS.get(init)


def is_known(init: str) -> bool:
    return init in INIT_SCHEMES or layer_init(init) is not None


def check_targets(init: str, kinds: list[str | None]) -> None:
    """Validate before anything is changed: an unknown name, or a layer kind the scheme cannot handle."""
    if not is_known(init):
        names = sorted(INIT_SCHEMES) + sorted(LAYER_INITS) + ["pissa_niter_K"]
        raise ValueError(f"LoraConfig.init={init!r}; choose one of {names}")
    bad = sorted({str(k) for k in kinds if k not in ("linear", "conv1d")})
    if layer_init(init) is not None and bad:
        raise ValueError(f"LoraConfig.init={init!r} initialises Linear/Conv1D layers only; targets include {bad}")


def initialise(layer: LoraLayer, name: str, init: str) -> None:
    """Run the layer-level scheme ``init`` on adapter ``name`` (nothing for A-only schemes)."""
    fn = layer_init(init)
    if fn is not None:
        fn(layer, name)


def initial_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A₀, B₀) of a PiSSA/OLoRA adapter, or None."""
    holder = layer._modules.get(_HOLDER)
    if not isinstance(holder, nn.ModuleDict) or name not in holder:
        return None
    init = holder[name]
    return init.A, init.B  # type: ignore[return-value]


def saved_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as written to a file: [A; A₀], [B, −B₀] for PiSSA/OLoRA (see module doc), else as stored."""
    a, b = layer.factors(name)
    init = initial_factors(layer, name)
    if init is None:
        return a, b
    a0, b0 = init
    return torch.cat([a, a0.to(a)], 0), torch.cat([b, -b0.to(b)], 1)


def saved_config(cfg: LoraConfig, ranks: dict[str, int],
                 alphas: dict[str, float]) -> tuple[LoraConfig, dict[str, int], dict[str, float]]:
    """The config of the rank-2r file: same scale s (α/r or α/√r), init back to the default."""
    if layer_init(cfg.init) is None:
        return cfg, ranks, alphas
    k = math.sqrt(2.0) if cfg.use_rslora else 2.0
    new = dataclasses.replace(
        cfg, r=2 * cfg.r, alpha=k * cfg.alpha, init="kaiming",
        rank_pattern={p: 2 * v for p, v in cfg.rank_pattern.items()},
        alpha_pattern={p: k * v for p, v in cfg.alpha_pattern.items()},
    )
    return new, {p: 2 * v for p, v in ranks.items()}, {p: k * v for p, v in alphas.items()}
