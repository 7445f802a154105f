"""Learnable mixing weights (method ``mix``): N frozen LoRA adapters, one trainable λ per adapter —
or per adapter and layer, or per adapter and module — trained with the run's objective:

    h = W₀x + Σₙ λₙ,g(module)·sₙ·Bₙ(Aₙx)

λ starts uniform (1/N: the adapters' average) and is unconstrained (it may turn negative: task
arithmetic's subtraction, learnt). Only N·G numbers train. The run saves ``mix_weights.json`` (λ by
adapter and group) and ``adapter/``: the exact composed adapter (``task_arithmetic`` of the
λ-scaled adapters, rank Σrₙ per module) in PEFT format, which loads anywhere with no deltatune
code. Like LoraHub (Huang et al. 2023) but with gradients instead of a gradient-free search.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["MixConfig", "MixWeights", "apply_mix", "save_mix", "mix_weights_of"]

_LAYER = re.compile(r".*?\.(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")
_ATTR = "deltatune_mix"


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class MixConfig:
    """Frozen adapters mixed by trainable weights λ (method 'mix')."""

    adapters: list[str] = field(default_factory=list, metadata=_doc(
        "Adapter directories (PEFT-format LoRA, of the run's base model) to mix; at least two."))
    granularity: Literal["adapter", "layer", "module"] = field(default="adapter", metadata=_doc(
        "One λ per adapter ('adapter'), per adapter and transformer block ('layer'), or per adapter and "
        "adapted module ('module')."))
    init: float | None = field(default=None, metadata=_doc("Initial λ for every adapter (null: 1/N, the average)."))

    def __post_init__(self) -> None:
        if self.granularity not in ("adapter", "layer", "module"):
            raise ValueError(f"mix.granularity must be 'adapter', 'layer' or 'module', got {self.granularity!r}")


def _group(path: str, granularity: str) -> str:
    if granularity == "adapter":
        return "all"
    if granularity == "module":
        return path
    m = _LAYER.match(path)
    return f"layer.{m.group(1)}" if m else "other"


class MixWeights(nn.Module):
    """λ (N, G) and, per adapted module, which group its λ comes from. Registered on the model as
    ``deltatune_mix``, so the loop trains, checkpoints and resumes it like any parameter."""

    def __init__(self, names: list[str], sources: list[str], groups: list[str], module_group: dict[str, int],
                 init: float) -> None:
        super().__init__()
        self.names, self.sources, self.groups, self.module_group = names, sources, groups, module_group
        self.lam = nn.Parameter(torch.full((len(names), len(groups)), float(init)))

    def table(self) -> dict[str, dict[str, float]]:
        lam = self.lam.detach().cpu()
        return {n: {g: float(lam[i, j]) for j, g in enumerate(self.groups)} for i, n in enumerate(self.names)}


def apply_mix(model: nn.Module, mcfg: MixConfig) -> MixWeights:
    """Load the adapters frozen, attach λ, and route it into every LoRA layer at each forward."""
    from ..inject import lora_layers
    from ..io import load_adapter

    if len(mcfg.adapters) < 2:
        raise ValueError(f"mix.adapters lists {len(mcfg.adapters)} adapter(s); mixing needs at least two")
    names = [f"mix{i}" for i in range(len(mcfg.adapters))]
    for n, d in zip(names, mcfg.adapters):
        load_adapter(model, d, name=n, trainable=False)
    paths = [p for p, layer in lora_layers(model) if any(n in layer.adapters for n in names)]
    groups: list[str] = []
    module_group: dict[str, int] = {}
    for p in paths:
        g = _group(p, mcfg.granularity)
        if g not in groups:
            groups.append(g)
        module_group[p] = groups.index(g)
    init = mcfg.init if mcfg.init is not None else 1.0 / len(names)
    mix = MixWeights(names, list(mcfg.adapters), groups, module_group, init).to(next(model.parameters()).device)
    from ..inject import set_active

    set_active(model, names)
    model.requires_grad_(False)
    model.add_module(_ATTR, mix)
    mix.lam.requires_grad_(True)
    layers = [(p, layer) for p, layer in lora_layers(model) if p in module_group]

    def route(_module: nn.Module, _args: Any) -> None:
        # Fresh 0-d views of λ each forward: the autograd graph of one step never outlives it.
        for p, layer in layers:
            j = module_group[p]
            layer.weights = {n: mix.lam[i, j] for i, n in enumerate(names) if n in layer.adapters}

    model.register_forward_pre_hook(route)
    route(model, ())
    return mix


def mix_weights_of(model: nn.Module) -> MixWeights:
    mix = getattr(model, _ATTR, None)
    if not isinstance(mix, MixWeights):
        raise ValueError("this model has no mixing weights (method 'mix' was not applied)")
    return mix


def save_mix(model: nn.Module, out_dir: Path) -> None:
    """``out_dir/mix_weights.json`` (λ by adapter and group) and ``out_dir/adapter`` (the composed adapter)."""
    from ..io import atomic_write_bytes
    from .combine import AdapterFactors, ModuleFactors, combine
    from .sources import from_model, save_composed

    mix = mix_weights_of(model)
    lam = mix.lam.detach().cpu().double()
    scaled = []
    for i, n in enumerate(mix.names):
        ad = from_model(model, n)
        mods = {p: ModuleFactors(m.kind, m.a, m.b, m.scale * float(lam[i, mix.module_group[p]]))
                for p, m in ad.modules.items()}
        scaled.append(AdapterFactors(mix.sources[i], mods, ad.fingerprint, ad.base_model_name_or_path, ad.task_type))
    composed = combine(scaled, [1.0] * len(scaled), "task_arithmetic")
    composed.method, composed.weights = "mix", []
    save_composed(composed, out_dir / "adapter", inputs=[Path(s) for s in mix.sources])
    table = {"granularity": "adapter" if mix.groups == ["all"] else "per-group", "groups": mix.groups,
             "adapters": dict(zip(mix.names, mix.sources)), "weights": mix.table()}
    atomic_write_bytes(out_dir / "mix_weights.json", (json.dumps(table, indent=2) + "\n").encode())
