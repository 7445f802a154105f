"""Composition on a loaded model: weighted active adapters, a new adapter made from loaded ones
(PEFT's ``add_weighted_adapter``), and merging a weighted combination into the base.

``set_weighted(model, {"a": 0.7, "b": 0.3})`` computes h = W₀x + Σ λₙ·sₙ·Bₙ(Aₙx) in the factors:
ΔW is never formed, so it costs what activating the adapters costs (one extra (N, r) scale per
adapter). That is exactly the ``cat`` / ``task_arithmetic`` adapter of the same weights.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..methods.lora import LoraLayer
from .combine import Composed, CompositionError, combine
from .sources import from_model

__all__ = ["set_weighted", "add_weighted_adapter", "merge_weighted", "load_composed"]


def _lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    from ..inject import lora_layers

    return list(lora_layers(model))


def set_weighted(model: nn.Module, weights: Mapping[str, float | torch.Tensor]) -> None:
    """Activate the named LoRA adapters with mixing weights λ (negative allowed). A 0-d tensor λ
    stays a tensor, so gradients reach it (learnable mixing); ``set_active`` clears the weights."""
    from ..inject import get_state, set_active
    from ..methods import dora

    state = get_state(model)
    for n in weights:
        if n not in state.configs:
            raise ValueError(f"no adapter named {n!r}; this model has {sorted(state.configs)}")
        if type(state.configs[n]).__name__ != "LoraConfig":
            raise CompositionError(f"adapter {n!r} is a {type(state.configs[n]).__name__} adapter; weighted "
                                   "activation is for LoRA adapters (VeRA/AdaLoRA: compose their files instead)")
    layers = _lora_layers(model)
    for path, layer in layers:
        if layer.merged:
            raise RuntimeError(f"module {path!r} has merged adapters {layer.merged}; unmerge before reweighting")
        for n in weights:
            if isinstance(layer, dora.DoraLayer) and layer.is_dora(n) and not _is_one(weights[n]):
                raise CompositionError(f"adapter {n!r}, module {path!r}: a DoRA adapter's magnitude does not scale "
                                       "linearly; it can only be active with weight 1")
    set_active(model, list(weights))
    for _, layer in layers:
        layer.weights = {n: w for n, w in weights.items() if n in layer.adapters}


def _is_one(w: float | torch.Tensor) -> bool:
    return not isinstance(w, torch.Tensor) and float(w) == 1.0


def load_composed(model: nn.Module, composed: Composed, name: str) -> nn.Module:
    """Add a composed adapter to ``model`` as LoRA adapter ``name`` (frozen; the active set is kept)."""
    from ..inject import get_state, inject, set_active
    from ..methods.lora_config import LoraConfig

    state = getattr(model, "deltatune_state", None)
    previous = list(get_state(model).active) if state is not None else []
    ranks = {p: m.rank for p, m in composed.modules.items()}
    r = max(ranks.values())
    cfg = LoraConfig(r=r, alpha=float(r), target_modules=list(ranks),
                     rank_pattern={re.escape(p): v for p, v in ranks.items() if v != r},
                     alpha_pattern={re.escape(p): float(v) for p, v in ranks.items() if v != r})
    inject(model, cfg, name=name)
    with torch.no_grad():
        for path, m in composed.modules.items():
            layer = model.get_submodule(path)
            a, b = layer.factors(name)  # type: ignore[operator]
            a.copy_(m.a.reshape(a.shape))
            b.copy_(m.b.reshape(b.shape))
            a.requires_grad_(False)
            b.requires_grad_(False)
    if previous:
        set_active(model, previous)
    return model


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], adapter_name: str,
                         combination_type: str = "svd", **options: object) -> Composed:
    """PEFT's ``add_weighted_adapter`` on a deltatune model: combine loaded LoRA adapters into a new
    adapter ``adapter_name`` (not activated, as in PEFT). Options are :func:`combine`'s (density,
    svd_rank, svd_clamp, majority_sign_method, seed, generator). Returns the composition report."""
    from ..inject import get_state
    from ..methods import lora_init

    state = get_state(model)
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; pick another name")
    for n in adapters:
        if n in state.configs and type(state.configs[n]).__name__ != "LoraConfig":
            raise CompositionError(f"adapter {n!r} is a {type(state.configs[n]).__name__} adapter; a new LoRA adapter "
                                   "cannot sit on its layers; compose its file (deltatune compose) instead")
        for path, layer in _lora_layers(model):
            if n in layer.adapters and lora_init.initial_factors(layer, n) is not None:
                raise CompositionError(f"adapter {n!r}, module {path!r}: a PiSSA/OLoRA adapter in memory leaves a residual "
                                       "base; save it (converted to plain LoRA) and compose the file instead")
    composed = combine([from_model(model, n) for n in adapters], list(weights), combination_type, **options)  # type: ignore[arg-type]
    load_composed(model, composed, adapter_name)
    return composed


@torch.no_grad()
def merge_weighted(model: nn.Module, weights: Mapping[str, float]) -> nn.Module:
    """W ← W₀ + Σ λₙ·sₙ·BₙAₙ into the base, in place: one addition per layer, so a 4-bit base is
    dequantized and requantized once, not once per adapter. ``deltatune.unmerge`` undoes it."""
    from ..methods.lora import add_to_weight

    set_weighted(model, weights)
    for _, layer in _lora_layers(model):
        names = [n for n in weights if n in layer.adapters]
        if not names:
            continue
        total = layer.delta(names[0])
        for n in names[1:]:
            total = total + layer.delta(n)
        add_to_weight(layer.base_layer, total)
        layer.merged.extend(names)
    return model
