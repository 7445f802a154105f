"""Target matching, in-place module replacement, freezing, adapter management and the parameter report.

The model stays the user's own ``transformers`` model: adapted layers are swapped for
:class:`~deltatune.methods.lora.LoraLayer` wrappers in place, and a small :class:`AdapterState`
rides along as ``model.deltatune_state`` (configs by adapter name, which are active).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .methods import dora, lora_init
from .methods.lora import INIT_SCHEMES, LoraLayer, supported_base
from .methods.lora_config import LoraConfig
from .methods.single import SingleAdapterLayer

if TYPE_CHECKING:
    from .registry import AdapterKind

__all__ = [
    "AdapterState", "ModulesToSave", "inject", "find_targets", "set_active", "disable_adapters",
    "delete_adapter", "adapter_per_sample", "merge", "unmerge", "unload", "parameter_report",
    "print_trainable_parameters", "lora_layers", "get_state",
]

_LAYER_INDEX = re.compile(r".*?\.(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


@dataclass
class AdapterState:
    """What deltatune added to a model: one config per adapter name, and the active names."""

    # LoraConfig for LoRA adapters; other methods store their own config dataclass here.
    configs: dict[str, Any] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)


def get_state(model: nn.Module) -> AdapterState:
    state = getattr(model, "deltatune_state", None)
    if not isinstance(state, AdapterState):
        raise ValueError("this model has no deltatune adapters; call deltatune.inject(model, config) first")
    return state


class ModulesToSave(nn.Module):
    """A module trained in full as a per-adapter copy (PEFT's ``modules_to_save``); keys match PEFT's
    ``<path>.modules_to_save.<adapter>.<param>`` / ``<path>.original_module.<param>``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)
        self.modules_to_save[name].requires_grad_(True)

    def forward(self, *args: object, **kwargs: object) -> object:
        if self.disabled or self.active is None or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head (never part of 'all-linear', as in PEFT/QLoRA)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out or name.split(".")[-1] in ("lm_head", "score", "classifier", "qa_outputs"):
            heads.add(name)
    return heads


def _name_matches(name: str, spec: list[str] | str) -> bool:
    """PEFT semantics: a string is a regex that must match the whole path; a list holds exact
    paths or dotted suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _pattern_value(patterns: dict[str, int] | dict[str, float], name: str) -> int | float | None:
    # PEFT's get_pattern_key: the pattern must match a dotted suffix of the module path.
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return value
    return None


def pattern_or(patterns: dict[str, int] | dict[str, float], name: str, default: float) -> float:
    """The pattern's value for ``name``, else ``default`` (not ``value or default``: 0 is a value)."""
    value = _pattern_value(patterns, name)
    return default if value is None else value


_INTERNAL = re.compile(
    r"\.(base_layer|lora_A|lora_B|lora_magnitude_vector|lora_initial|original_module|modules_to_save)(\.|$)")


def _user_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The model's modules under the user's names: a wrapper stands for the module it wraps, and
    its internals (base_layer, lora_A, …) are hidden."""
    for name, module in model.named_modules():
        if name and not _INTERNAL.search(name):
            yield name, module


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths the config adapts, in model order. Raises if nothing matches, listing what exists."""
    heads = _output_head_names(model)
    spec = config.target_modules
    found: list[str] = []
    layer_ids: set[int] = set()  # block indices of modules the targets matched (for the error below)
    for name, module in _user_modules(model):
        if isinstance(module, ModulesToSave):
            continue
        if any(name == m or name.endswith("." + m) or name.startswith(m + ".") for m in config.modules_to_save):
            continue
        kind = supported_base(module.base_layer if isinstance(module, LoraLayer) else module)
        if spec == "all-linear":
            hit = kind in ("linear", "conv1d") and name not in heads
        else:
            hit = _name_matches(name, spec)
        if not hit:
            continue
        if config.exclude_modules and _name_matches(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            m = _LAYER_INDEX.match(name)
            if m is not None:
                layer_ids.add(int(m.group(1)))
            if m is None or int(m.group(1)) not in config.layers_to_transform:
                continue
        if kind is None:
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}; LoRA supports nn.Linear, Conv1D, "
                "nn.Embedding and nn.Conv2d (groups=1)"
            )
        found.append(name)
    if not found and layer_ids:  # the targets matched; the block indices left nothing
        raise ValueError(
            f"layers_to_transform={config.layers_to_transform} selects no block of {type(model).__name__}: "
            f"its targeted blocks are numbered {min(layer_ids)}..{max(layer_ids)}"
        )
    if not found:
        leaf_names = sorted({n.split(".")[-1] for n, m in _user_modules(model)
                             if supported_base(m.base_layer if isinstance(m, LoraLayer) else m)})
        hint = ""
        if isinstance(spec, list):
            close = {c for t in spec for c in difflib.get_close_matches(t, leaf_names, n=2)}
            hint = f" Did you mean {sorted(close)}?" if close else ""
        raise ValueError(
            f"target_modules={spec!r} matched no module of {type(model).__name__}. Adaptable module names "
            f"are: {leaf_names}.{hint}"
        )
    return found


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """Add LoRA adapter ``name`` to ``model`` in place, make it the active adapter, freeze everything
    else, and return the model."""
    state = getattr(model, "deltatune_state", None)
    if not isinstance(state, AdapterState):
        state = AdapterState()
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists; pick another name or delete_adapter() it first")
    targets = find_targets(model, config)
    # Validate before touching the model so a bad config leaves it as it was.
    modules = [model.get_submodule(p) for p in targets]
    kinds = [supported_base(m.base_layer if isinstance(m, LoraLayer) else m) for m in modules]
    lora_init.check_targets(config.init, kinds)
    if config.use_dora and "conv2d" in kinds:
        raise ValueError("use_dora: DoRA supports Linear, Conv1D and Embedding targets, not Conv2d")
    _paths_to_save(model, config.modules_to_save)
    for path in targets:
        module = model.get_submodule(path)
        layer = module if isinstance(module, LoraLayer) else LoraLayer(module)
        layer = dora.upgrade(layer) if config.use_dora else layer
        r = int(pattern_or(config.rank_pattern, path, config.r))
        alpha = float(pattern_or(config.alpha_pattern, path, config.alpha))
        a_init = config.init if config.init in INIT_SCHEMES else "kaiming"  # PiSSA/OLoRA overwrite A, B
        layer.add(name, r, alpha, dropout=config.dropout, rslora=config.use_rslora, init=a_init)
        lora_init.initialise(layer, name, config.init)
        if isinstance(layer, dora.DoraLayer) and config.use_dora:
            layer.enable_dora(name)  # after the init: m = ‖W₀ + s·BA‖ of the final factors
        if layer is not module:
            layer.train(module.training)  # a new nn.Module starts in train mode; follow the model's
            _set_module(model, path, layer)
    for path in _paths_to_save(model, config.modules_to_save):
        module = model.get_submodule(path)
        wrapper = module if isinstance(module, ModulesToSave) else ModulesToSave(module)
        wrapper.add(name)
        if wrapper is not module:
            wrapper.train(module.training)
            _set_module(model, path, wrapper)
    state.configs[name] = config
    model.deltatune_state = state  # type: ignore[assignment]
    set_active(model, name)
    return model


def _paths_to_save(model: nn.Module, names: list[str]) -> list[str]:
    """Paths of ``modules_to_save`` (exact or dotted suffix), outside any wrapper's internals."""
    if not names:
        return []
    found = [
        path for path, _ in model.named_modules()
        if path and any(path == m or path.endswith("." + m) for m in names)
        and ".modules_to_save." not in path and ".original_module" not in path
    ]
    if not found:
        raise ValueError(f"modules_to_save={names!r} matched no module of {type(model).__name__}")
    return found


def _kinds_present(model: nn.Module) -> list[AdapterKind]:
    """The adapter kinds (registry.ADAPTERS) of the adapters on ``model``, in the order added; LoRA
    when the model has no adapter state (its operations are then no-ops or act on bare LoRA layers)."""
    from .registry import ADAPTERS, kind_of

    state = getattr(model, "deltatune_state", None)
    configs = state.configs.values() if isinstance(state, AdapterState) else []
    kinds: dict[str, AdapterKind] = {}
    for c in configs:
        kind = kind_of(c)
        kinds.setdefault(kind.name, kind)
    return list(kinds.values()) or [ADAPTERS["lora"]]


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Activate adapter(s) (their outputs add up) and make exactly their parameters trainable."""
    from .registry import kind_of

    state = get_state(model)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in state.configs:
            raise ValueError(f"no adapter named {n!r}; this model has {sorted(state.configs)}")
    kinds = {kind_of(state.configs[n]).name: kind_of(state.configs[n]) for n in names}
    if len(kinds) > 1:
        raise ValueError(f"adapters {names} are of different methods {sorted(kinds)}; activate one kind")
    if not kinds:
        lora_set_active(model, [])
        return
    next(iter(kinds.values())).set_active(model, names)


def lora_set_active(model: nn.Module, names: list[str]) -> None:
    """:func:`set_active` for LoRA adapters (and DoRA / modules_to_save / bias modes)."""
    state = get_state(model)
    state.active = names
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.adapters]
        layer.weights = {}  # plain activation: every λ = 1 (compose.set_weighted sets others)
        for n in layer.adapters:
            for p in _adapter_params(layer, n):
                p.requires_grad_(n in names)
    for module in model.modules():
        if isinstance(module, ModulesToSave):
            module.active = next((n for n in names if n in module.modules_to_save), None)
            for n, copy_ in module.modules_to_save.items():
                copy_.requires_grad_(n in names)
    # Bias modes (PEFT): 'all' trains every bias, 'lora_only' the biases of adapted layers.
    for n in names:
        bias = getattr(state.configs[n], "bias", "none")
        if bias == "all":
            for pname, p in model.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    p.requires_grad_(True)
        elif bias == "lora_only":
            for _, layer in lora_layers(model):
                b = getattr(layer.base_layer, "bias", None)
                if n in layer.adapters and isinstance(b, nn.Parameter):
                    b.requires_grad_(True)


def _adapter_params(layer: LoraLayer, name: str) -> list[nn.Parameter]:
    if isinstance(layer, dora.DoraLayer):
        return layer.adapter_parameters(name)
    a, b = layer.factors(name)
    return [a, b]  # type: ignore[list-item]


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base model (merged adapters are unmerged
    for the duration and merged back after)."""
    layers = [layer for _, layer in lora_layers(model)]
    merged = {id(layer): list(layer.merged) for layer in layers}
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSave)]
    # VeRA/AdaLoRA layers carry their own `disabled` flag (and refuse it while merged).
    singles = [m for m in model.modules() if isinstance(m, SingleAdapterLayer)]
    with contextlib.ExitStack() as stack:
        for kind in _kinds_present(model):
            if kind.disable is not None:  # adapters outside the layers (bottleneck sites, the prompt seam)
                stack.enter_context(kind.disable(model))
        try:
            for layer in layers:
                layer.unmerge()
                layer.disabled = True
            for w in wrappers:
                w.disabled = True
            for m in singles:
                m.disabled = True
            yield
        finally:
            for layer in layers:
                layer.disabled = False
                layer.merge(merged[id(layer)])
            for w in wrappers:
                w.disabled = False
            for m in singles:
                m.disabled = False


@contextlib.contextmanager
def adapter_per_sample(model: nn.Module, names: list[str | None]) -> Iterator[None]:
    """Route each row of the batch (dim 0) through its own adapter; ``None`` means the base model.
    Works in training too: gradients reach each adapter from its own rows only."""
    state = get_state(model)
    for n in names:
        if n is not None and n not in state.configs:
            raise ValueError(f"no adapter named {n!r}; this model has {sorted(state.configs)}")
    layers = [layer for _, layer in lora_layers(model)]
    try:
        for layer in layers:
            layer.per_sample = list(names)
        yield
    finally:
        for layer in layers:
            layer.per_sample = None


def delete_adapter(model: nn.Module, name: str) -> None:
    from .registry import kind_of

    state = get_state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    kind_of(state.configs[name]).delete(model, name)


def lora_delete(model: nn.Module, name: str) -> None:
    state = get_state(model)
    for path, layer in list(lora_layers(model)):
        if name in layer.adapters:
            layer.delete(name)
        if not layer.adapters:
            _set_module(model, path, layer.base_layer)
    for path, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            del module.modules_to_save[name]
            if not len(module.modules_to_save):
                _set_module(model, path, module.original_module)
    del state.configs[name]
    state.active = [n for n in state.active if n != name]
    if state.active:
        set_active(model, state.active)


def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """W ← W₀ + Σ s·BA for the active (or the named) adapters, in place; undone by :func:`unmerge`.
    VeRA and AdaLoRA merge likewise; bottleneck and prompt adapters cannot be merged (an error)."""
    kinds = _kinds_present(model)
    _refuse_unmergeable(kinds, "merge")
    for kind in kinds:
        assert kind.merge is not None
        kind.merge(model, names)
    return model


def lora_merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.merge([n for n in names if n in layer.adapters] if names is not None else None)
    return model


def _refuse_unmergeable(kinds: list[AdapterKind], what: str) -> None:
    bad = [k.name for k in kinds if k.merge is None]
    if bad:
        raise ValueError(
            f"cannot {what}: {'/'.join(sorted(bad))} adapters are not a weight delta (a nonlinear adapter or "
            "virtual tokens); keep them as adapters (deltatune.save_adapter) and load them at inference"
        )


def unmerge(model: nn.Module) -> nn.Module:
    """W ← W − s·BA for the merged adapters (as PEFT does). Exact up to rounding: the add and the
    subtract each round, so about 1 % (fp32) to 2 % (bf16) of the weights come back one ulp off;
    keep a copy of the base weights if their exact bits matter."""
    for kind in _kinds_present(model):
        if kind.unmerge is not None:
            kind.unmerge(model)
    return model


def lora_unmerge(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_adapters: bool = True) -> nn.Module:
    """Remove every deltatune wrapper and return the plain model (with the active adapters merged
    unless ``merge_adapters=False``). ``save_pretrained`` then writes an ordinary checkpoint."""
    kinds = _kinds_present(model)
    if merge_adapters:
        _refuse_unmergeable(kinds, "merge and unload")
    # Adapters that are no weight delta are dropped first; then each kind removes its layers.
    for kind in sorted(kinds, key=lambda k: k.merge is not None):
        kind.unload(model, merge_adapters)
    if hasattr(model, "deltatune_state"):
        del model.deltatune_state
    return model


def lora_unload(model: nn.Module, merge_adapters: bool = True) -> nn.Module:
    for path, layer in list(lora_layers(model)):
        if merge_adapters:
            layer.merge()
        _set_module(model, path, layer.base_layer)
    for path, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            keep = module.modules_to_save[module.active] if module.active and merge_adapters else module.original_module
            _set_module(model, path, keep)
    return model


def parameter_report(model: nn.Module) -> dict[str, object]:
    """Counts as PEFT reports them, plus a per-module breakdown of the trainable parameters."""
    trainable = 0
    total = 0
    per_module: dict[str, int] = {}
    for pname, p in model.named_parameters():
        n = p.numel()
        # Packed 4-bit storage holds two parameters per byte (PEFT counts them the same way).
        if getattr(p, "dtype", None) == torch.uint8:
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
            # The trailing dot lets a tag match a ParameterDict entry ('<path>.vera_lambda_b.<adapter>').
            module = pname.rsplit(".", 1)[0] + "."
            for tag in (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.",
                        ".lora_E.", ".vera_lambda_b.", ".vera_lambda_d.", ".modules_to_save."):
                module = module.split(tag)[0]
            module = module.rstrip(".")
            per_module[module] = per_module.get(module, 0) + n
    pct = 100.0 * trainable / total if total else 0.0
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"
    return {"trainable": trainable, "total": total, "percent": pct, "line": line, "per_module": per_module}


def print_trainable_parameters(model: nn.Module, per_module: bool = False) -> None:
    report = parameter_report(model)
    print(report["line"])
    if per_module:
        for name, n in report["per_module"].items():  # type: ignore[attr-defined]
            print(f"  {name}: {n:,d}")
