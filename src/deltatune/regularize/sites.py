"""What a weight-space regulariser (EWC, L2-SP) pulls back: the run's *effective* weight changes.

A :class:`Site` is one tensor of the model the penalty is written in, with its change since the start:

* full / partial / head fine-tuning: every trainable parameter θ, change θ − θ* (θ* = its value at
  the start, copied once);
* LoRA: the frozen base weight W₀ of every adapted layer, change ΔW = Σ_active s·B·A (θ* = W₀, so
  nothing is copied), computed from the factors on the fly in the base weight's layout;
* anything else a LoRA run trains (biases, ``modules_to_save`` copies): as for full fine-tuning.

:func:`quadratic` evaluates Σ_i w_i·change_i² site by site under non-reentrant activation
checkpointing, so neither pass holds more than one site's change (one layer's ΔW) at a time: the
backward recomputes it. DoRA, VeRA, AdaLoRA, bottleneck and prompt adapters are not a plain
low-rank ΔW of this form; the regularisers refuse them with a message (``regularize.kl`` works for
every method).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..methods.lora import LoraLayer

__all__ = ["Site", "sites", "lora_delta", "quadratic", "at_least_fp32", "whole"]


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp32 for 16-bit tensors; fp32/fp64 stay as they are (tests run the maths in fp64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


@dataclass
class Site:
    name: str  # a parameter name of the model (W₀'s name for a LoRA layer)
    initial: torch.Tensor  # ``param`` when the sites were built (whole, before any wrapping)
    star: torch.Tensor | None  # θ* for a trained parameter; None for a LoRA base (θ* = W₀ itself)
    change: Callable[[], torch.Tensor]  # θ − θ* or ΔW, differentiable, fp32, shaped like ``param``
    lora: tuple[LoraLayer, str] | None = None  # a LoRA site with one active adapter: the fast path
    owner: nn.Module | None = None  # the module holding a trained parameter as ``attr``
    attr: str = ""

    @property
    def param(self) -> torch.Tensor:
        """The tensor whose shape the weights (Fisher) have, and whose grad estimates it. Read from its
        module each time: FSDP2 replaces a module's parameters by sharded DTensors when it wraps the
        model, and a penalty on the tensor captured before would see weights that never change."""
        return self.initial if self.owner is None else getattr(self.owner, self.attr)


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the whole tensor of a sharded DTensor (a collective: every rank calls it)."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full``, or for a sharded DTensor ``like`` the part of the whole tensor ``full`` that its
    local shard holds (a view, no copy)."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)  # type: ignore[attr-defined]
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))]


def lora_delta(layer: LoraLayer, name: str) -> torch.Tensor:
    """s·ΔW of adapter ``name`` in the base weight's layout, differentiable in A and B (fp32).

    linear W₀ (d, k) = B (d, r) @ A (r, k); Conv1D and Embedding store the transpose; Conv2d
    B (d, r, 1, 1) · A (r, k, kh, kw) → (d, k, kh, kw)."""
    a, b = (at_least_fp32(t) for t in layer.factors(name))
    s = layer.adapters[name].scale
    if layer.kind == "linear":
        return (b @ a) * s
    if layer.kind in ("conv1d", "embedding"):
        return (b @ a).t() * s
    return torch.einsum("dr,rkhw->dkhw", b.flatten(1), a) * s  # conv2d


def _unsupported(model: nn.Module, what: str) -> None:
    from ..methods.dora import DoraLayer

    for path, m in model.named_modules():
        kind = type(m).__name__
        if isinstance(m, DoraLayer) and any(m.is_dora(n) for n in m.adapters):
            raise ValueError(f"{what}: {path} is a DoRA layer, whose weight change is not s·BA; use regularize.kl")
        if kind in ("VeraLayer", "AdaLoraLayer", "PromptSeam") or kind.startswith("Bottleneck"):
            raise ValueError(f"{what}: {path} is a {kind}; {what} supports LoRA and full/partial/head fine-tuning "
                             "(a weight change s·BA or θ − θ*): use regularize.kl for this method")


def sites(model: nn.Module, what: str = "regularize") -> list[Site]:
    """The sites of ``model`` as the method left it (call after ``method.apply``, before training)."""
    _unsupported(model, what)
    names = {id(p): n for n, p in model.named_parameters()}
    covered: set[int] = set()
    out: list[Site] = []
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        active = [n for n in layer.active if n in layer.adapters]
        factors = [t for n in active for t in layer.factors(n)]
        if not any(t.requires_grad for t in factors):
            continue
        covered.update(id(t) for t in factors)
        w0 = layer.base_weight()
        if not w0.is_floating_point():
            raise ValueError(f"{what}: {path} has a quantized base ({w0.dtype}); the penalty needs a float W₀ "
                             "(use method lora, or regularize.kl)")

        def change(layer: LoraLayer = layer, active: list[str] = active) -> torch.Tensor:
            total = lora_delta(layer, active[0])
            for n in active[1:]:
                total = total + lora_delta(layer, n)
            return total

        fast = (layer, active[0]) if len(active) == 1 and layer.kind in ("linear", "conv1d", "embedding") else None
        out.append(Site(names.get(id(w0), f"{path}.base_layer.weight"), w0, None, change, fast))
    for n, p in model.named_parameters():
        if p.requires_grad and id(p) not in covered:
            star = at_least_fp32(p.detach()).clone()
            path, _, attr = n.rpartition(".")
            owner = model.get_submodule(path)

            def moved(owner: nn.Module = owner, attr: str = attr, star: torch.Tensor = star) -> torch.Tensor:
                # differentiable θ − θ* (quadratic() uses _ParamQuad's hand-written gradient instead)
                return at_least_fp32(getattr(owner, attr)) - star

            out.append(Site(n, p, star, moved, owner=owner, attr=attr))
    if not out:
        raise ValueError(f"{what}: the model has no trainable parameter to regularise")
    return out


class _LowRankQuad(torch.autograd.Function):
    """Σ w ⊙ (s·BA)² for one LoRA layer with its gradients formed in the forward pass:
    ∂/∂B = 2s·(w⊙ΔW)·Aᵀ (d, r) and ∂/∂A = 2s·Bᵀ·(w⊙ΔW) (r, k) are all that is kept, so ΔW (d, k)
    is built once and freed at once (the checkpointed route builds it twice and back-propagates
    through it: 1.6× the cost on the default model)."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None, scale: float,
                transposed: bool) -> torch.Tensor:
        a32, b32 = at_least_fp32(a.detach()), at_least_fp32(b.detach())  # (r, k), (d, r)
        dw = (b32 @ a32) * scale  # (d, k)
        g = dw if weight is None else dw * (weight.t() if transposed else weight)  # w stored as (k, d) when transposed
        ctx.save_for_backward((2 * scale) * (b32.t() @ g), (2 * scale) * (g @ a32.t()))
        ctx.dtypes = (a.dtype, b.dtype)
        return (g * dw).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ga, gb = ctx.saved_tensors
        return (grad * ga).to(ctx.dtypes[0]), (grad * gb).to(ctx.dtypes[1]), None, None, None


class _ParamQuad(torch.autograd.Function):
    """Σ w ⊙ (θ − θ*)² for a trained parameter (full / partial / head), with the gradient
    2·w ⊙ (θ − θ*) written by hand: one temporary the size of θ in forward and one in backward
    (the gradient itself), where autograd through (θ − θ*)², checkpointed, kept four and took 1.4×
    a plain full fine-tuning step on the default model. fp32 whatever θ's dtype (θ* is fp32).

    Under FSDP2 ``param`` is a sharded DTensor: each rank computes its shard's part (θ* and w are
    whole tensors, sliced to that shard as views) and returns the sum over its shard, whose gradient
    is exactly that shard's gradient; the loss value then differs between ranks, its gradient does not.
    """

    @staticmethod
    def forward(ctx: Any, param: torch.Tensor, star: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(param, star, weight)
        d = _ParamQuad._weighted_moved(param, star, weight, square=True)
        return d.sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        param, star, weight = ctx.saved_tensors
        g = _ParamQuad._weighted_moved(param, star, weight, square=False).mul_(2 * grad).to(param.dtype)
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import DTensor

            return (DTensor.from_local(g, param.device_mesh, param.placements, run_check=False,  # type: ignore[attr-defined]
                                       shape=param.shape, stride=param.stride()), None, None)
        return g, None, None

    @staticmethod
    def _weighted_moved(param: torch.Tensor, star: torch.Tensor, weight: torch.Tensor | None, *,
                        square: bool) -> torch.Tensor:
        """w ⊙ (θ − θ*) (or w ⊙ (θ − θ*)²) as one new fp32 tensor, worked on in place; this rank's
        shard of it for a DTensor ``param``."""
        local = param.detach()
        local = local.to_local() if hasattr(local, "to_local") else local
        d = at_least_fp32(local) - _shard(star, param)
        if square:
            d.square_()
        return d if weight is None else d.mul_(_shard(weight, param))


def _lora_quad(layer: LoraLayer, name: str, weight: torch.Tensor | None) -> torch.Tensor:
    a, b = layer.factors(name)
    out: torch.Tensor = _LowRankQuad.apply(a, b, weight, layer.adapters[name].scale, layer.kind != "linear")
    return out


def _weighted_square(change: Callable[[], torch.Tensor], weight: torch.Tensor | None) -> torch.Tensor:
    d = change()
    return (d.square() * weight).sum() if weight is not None else d.square().sum()


def quadratic(site_list: list[Site], weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_sites Σ_i w_i·change_i² (w = 1 without ``weights``), fp32, autocast off; one site's change
    alive at a time in forward and backward (checkpointed)."""
    device = site_list[0].param.device
    total = torch.zeros((), device=device)
    with torch.autocast(device_type=device.type, enabled=False):
        for s in site_list:
            w = weights[s.name] if weights is not None else None
            if s.lora is not None:
                if any(hasattr(t, "device_mesh") for t in s.lora[0].factors(s.lora[1])):
                    raise ValueError(f"{s.name}: a penalty on a LoRA weight change needs whole factors; under "
                                     "runtime.strategy fsdp2 they are sharded: use ddp (auto) for adapters")
                total = total + _lora_quad(*s.lora, w)
            elif s.star is not None:
                total = total + _ParamQuad.apply(s.param, s.star, w)
            elif torch.is_grad_enabled():
                total = total + checkpoint(_weighted_square, s.change, w, use_reentrant=False)
            else:
                total = total + _weighted_square(s.change, w)
    return total
