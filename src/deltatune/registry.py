"""The dispatch tables — the only place a method, an adapter kind or an objective is looked up by name.

``METHODS``     ``method: NAME`` → its config section, ``apply``, what it saves, its adapter kind,
                whether a 4-bit base is allowed. ``deltatune train --help``, the README's method table
                and ``TrainConfig``'s sections read it (tests/test_registry.py::
                test_readme_help_and_registry_list_the_same_methods checks they agree).
``ADAPTERS``    an adapter kind (one per config class kept in ``model.deltatune_state``) → its file
                format (``peft_type`` values), save/load, merge/unmerge/unload, delete, set_active,
                disable and ``describe`` (``deltatune info``). ``inject.py`` and ``io.py`` dispatch here.
``OBJECTIVES``  ``objective: NAME`` → an :class:`~deltatune.objectives.base.Objective` subclass; one
                with a ``Config`` dataclass gets a ``TrainConfig`` section of its name.

Each ``apply(model, cfg, info)`` takes the loaded model, the whole ``TrainConfig`` (the config object,
never exploded) and the run's :class:`~deltatune.train.hooks.RunInfo`; it changes the model in place
so that exactly the parameters the method trains have ``requires_grad=True`` and returns the method's
training hooks (AdaLoRA's rank allocator; most methods have none).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from . import describe, io
from .compose.mix import MixConfig
from .inject import (
    get_state,
    lora_delete,
    lora_merge,
    lora_set_active,
    lora_unload,
    lora_unmerge,
)
from .inject import inject as inject_lora
from .methods import adalora, bottleneck, prompts, strategies, vera
from .methods.adalora import AdaLoraConfig
from .methods.bottleneck import BottleneckConfig
from .methods.lora_config import LoraConfig
from .methods.prompts import PromptConfig
from .methods.strategies import PartialConfig
from .methods.vera import VeraConfig
from .objectives.base import Objective
from .objectives.causal_lm import CausalLM
from .objectives.classify import Classify
from .objectives.dreambooth import DreamBooth
from .objectives.multitask import MultiTask
from .train.hooks import Hook, RunInfo

if TYPE_CHECKING:
    from .io import AdapterFile

__all__ = ["Section", "AdapterKind", "Method", "METHODS", "ADAPTERS", "OBJECTIVES", "method_names", "get_method",
           "get_objective", "kind_of", "kind_for_peft_type", "sections", "apply_method", "QUANT_TYPES"]


@dataclass(frozen=True)
class Section:
    """A ``TrainConfig`` section that configures a method (several methods may share one)."""

    name: str
    cls: type
    default: Callable[[], Any]  # TrainConfig's default for the section (may differ from cls())
    doc: str


@dataclass(frozen=True)
class AdapterKind:
    """One family of adapter layers and files. ``merge``/``unmerge`` are None for adapters that are
    no weight delta (bottleneck, virtual tokens): merging them is an error."""

    name: str
    config: type  # the config class stored per adapter in model.deltatune_state (the dispatch key)
    peft_types: tuple[str, ...]  # adapter_config.json "peft_type" values this kind reads and writes
    save: Callable[[nn.Module, Path, str], Path]
    load: Callable[..., nn.Module]  # (model, AdapterFile, name, *, trainable, activate)
    describe: Callable[[AdapterFile], list[str]]
    set_active: Callable[[nn.Module, list[str]], None]
    delete: Callable[[nn.Module, str], None]
    unload: Callable[[nn.Module, bool], nn.Module]  # remove every adapter of this kind (merging or not)
    merge: Callable[[nn.Module, list[str] | None], nn.Module] | None = None
    unmerge: Callable[[nn.Module], nn.Module] | None = None
    # A context in which this kind's adapters are off; None: its layers' own `disabled` flags (inject.py).
    disable: Callable[[nn.Module], contextlib.AbstractContextManager[None]] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help and the README table: Δf(x) and what trains
    apply: Callable[[nn.Module, Any, RunInfo], list[Hook]]
    saves: str  # "adapter" (PEFT-format adapter dir) or "model" (full HF checkpoint)
    section: Section | None = None
    adapter: AdapterKind | None = None
    quantizable: bool = True  # a 4-bit frozen base is allowed (model.quantize, a 4-bit checkpoint)
    base_quant: str = "none"  # an alias that implies model.quantize (qlora = lora + nf4)
    check: Callable[[Any], None] | None = None  # cross-section validation of a TrainConfig
    # Writes the method's own files into the run directory instead of the default for `saves` (mix).
    save: Callable[[nn.Module, Path], None] | None = None


# ------------------------------------------------------------------------------------ sections
def _default_lora() -> LoraConfig:
    # Tuned for the built-in task on SmolLM2-135M: QLoRA's finding that adapting every linear
    # layer matches full fine-tuning, with a rank large enough to learn the output format in one epoch.
    return LoraConfig(r=16, alpha=32.0, target_modules="all-linear")


LORA = Section("lora", LoraConfig, _default_lora, "LoRA settings (methods 'lora', 'qlora', 'dora').")
PARTIAL = Section("partial", PartialConfig, PartialConfig, "Settings for method 'partial'.")
BOTTLENECK = Section("bottleneck", BottleneckConfig, BottleneckConfig, "Bottleneck adapter settings (method 'bottleneck').")
PROMPT = Section("prompt", PromptConfig, PromptConfig,
                 "Virtual-token settings (methods 'prompt_tuning', 'prefix_tuning', 'p_tuning_v2').")
VERA = Section("vera", VeraConfig, VeraConfig, "VeRA settings (method 'vera').")
ADALORA = Section("adalora", AdaLoraConfig, AdaLoraConfig, "AdaLoRA settings (method 'adalora').")
MIX = Section("mix", MixConfig, MixConfig, "Learnable mixing weights over frozen LoRA adapters (method 'mix').")


# ------------------------------------------------------------------------------------ adapter kinds
def _single_set_active(model: nn.Module, names: list[str]) -> None:
    get_state(model).active = names  # one VeRA/AdaLoRA adapter per model: always the active one


def _single_delete(unload: Callable[..., nn.Module]) -> Callable[[nn.Module, str], None]:
    def delete(model: nn.Module, name: str) -> None:
        unload(model, merge_adapter=False)  # the one adapter of the model
    return delete


def _prompt_set_active(model: nn.Module, names: list[str]) -> None:
    if len(names) != 1:
        raise ValueError("one prompt/prefix adapter can be active at a time")
    prompts.set_active(model, names[0])


def _bottleneck_unload(model: nn.Module, merge: bool) -> nn.Module:
    for n in [n for n, c in get_state(model).configs.items() if isinstance(c, BottleneckConfig)]:
        bottleneck.delete(model, n)
    return model


def _prompt_unload(model: nn.Module, merge: bool) -> nn.Module:
    for n in [n for n, c in get_state(model).configs.items() if isinstance(c, PromptConfig)]:
        prompts.delete(model, n)
    return model


ADAPTERS: dict[str, AdapterKind] = {k.name: k for k in [
    AdapterKind("lora", LoraConfig, ("LORA",), io.save_lora, io.load_lora, describe.describe_lora,
                lora_set_active, lora_delete, lora_unload, lora_merge, lora_unmerge),
    AdapterKind("vera", VeraConfig, ("VERA",), vera.save_peft, vera.load_peft, describe.describe_vera,
                _single_set_active, _single_delete(vera.unload),
                lambda m, merge: vera.unload(m, merge_adapter=merge), lambda m, names: vera.merge(m), vera.unmerge),
    AdapterKind("adalora", AdaLoraConfig, ("ADALORA",), adalora.save_peft, adalora.load_peft,
                describe.describe_adalora, _single_set_active, _single_delete(adalora.unload),
                lambda m, merge: adalora.unload(m, merge_adapter=merge), lambda m, names: adalora.merge(m),
                adalora.unmerge),
    AdapterKind("bottleneck", BottleneckConfig, (BottleneckConfig.PEFT_TYPE,), bottleneck.save_peft,
                bottleneck.load_peft, describe.describe_bottleneck, bottleneck.set_active, bottleneck.delete,
                _bottleneck_unload, disable=bottleneck.disable),
    AdapterKind("prompts", PromptConfig, ("PROMPT_TUNING", "PREFIX_TUNING"), prompts.save_peft, prompts.load_peft,
                describe.describe_prompts, _prompt_set_active, prompts.delete, _prompt_unload,
                disable=prompts.disable),
]}


def kind_of(config: Any) -> AdapterKind:
    """The adapter kind of an adapter's config object (DoRA/PiSSA are LoRA configs)."""
    for kind in ADAPTERS.values():
        if isinstance(config, kind.config):
            return kind
    raise TypeError(f"{type(config).__name__} is not the config of a registered adapter kind "
                    f"({', '.join(k.config.__name__ for k in ADAPTERS.values())})")


def kind_for_peft_type(peft_type: str, where: Path | None = None) -> AdapterKind:
    for kind in ADAPTERS.values():
        if peft_type in kind.peft_types:
            return kind
    known = sorted(t for k in ADAPTERS.values() for t in k.peft_types)
    raise io.AdapterFileError(f"{where or 'adapter'}: peft_type={peft_type!r} is not a method deltatune reads "
                              f"({', '.join(known)})")


# ------------------------------------------------------------------------------------ methods
def _apply_lora(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    inject_lora(model, cfg.lora)
    return []


def _apply_dora(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    inject_lora(model, dataclasses.replace(cfg.lora, use_dora=True))
    return []


def _apply_vera(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    vera.inject_vera(model, cfg.vera)
    return []


def _apply_bottleneck(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    bottleneck.inject(model, cfg.bottleneck)
    return []


def _apply_mix(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    from .compose.mix import apply_mix

    apply_mix(model, cfg.mix)
    return []


def _save_mix(model: nn.Module, out_dir: Path) -> None:
    from .compose.mix import save_mix

    save_mix(model, out_dir)


def _prompt_apply(kind: str, projection: bool | None) -> Callable[[nn.Module, Any, RunInfo], list[Hook]]:
    """The three prompt methods share the ``prompt:`` section; the method picks the seam (and P-Tuning v2
    is prefix tuning without the MLP reparameterisation)."""

    def apply(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
        fixed: dict[str, Any] = {"kind": kind} if projection is None else {"kind": kind, "projection": projection}
        # init='text' tokenizes with the run's own tokenizer unless prompt.tokenizer names one.
        tokenizer = info.processor if cfg.prompt.tokenizer is None else None
        prompts.inject(model, dataclasses.replace(cfg.prompt, **fixed), tokenizer=tokenizer)
        return []

    return apply


def _check_no_projection(method: str) -> Callable[[Any], None]:
    def check(cfg: Any) -> None:
        if cfg.prompt.projection:
            raise ValueError(f"prompt.projection=true is prefix tuning's MLP reparameterisation; method {method!r} has "
                             "none: use method 'prefix_tuning' or set prompt.projection=false")
    return check


def _check_prefix(method: str, projection_ok: bool) -> Callable[[Any], None]:
    def check(cfg: Any) -> None:
        if not projection_ok:
            _check_no_projection(method)(cfg)
        if cfg.train.gradient_checkpointing:
            raise ValueError(f"method {method!r} cannot use train.gradient_checkpointing (checkpointed layers drop the "
                             "KV cache that carries the prefix): set it to false")
    return check


_LORA, _VERA, _ADALORA = ADAPTERS["lora"], ADAPTERS["vera"], ADAPTERS["adalora"]
_BOTTLENECK, _PROMPTS = ADAPTERS["bottleneck"], ADAPTERS["prompts"]

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("lora", "LoRA: (α/r)·B(A·x) on the target linears; trains r(d+k) per layer", _apply_lora, "adapter",
           LORA, _LORA),
    Method("qlora", "QLoRA: LoRA over an NF4 (double-quantized) frozen base (= lora + model.quantize=nf4)",
           _apply_lora, "adapter", LORA, _LORA, base_quant="nf4"),
    Method("dora", "DoRA: m·(W₀ + (α/r)·BA)/‖W₀ + (α/r)·BA‖_c · x − W₀x (the lora: section); trains r(d+k) + d "
           "per layer", _apply_dora, "adapter", LORA, _LORA),
    Method("vera", "VeRA: Λ_b·B·Λ_d·A·x, A and B frozen, random, shared by all layers; trains d_out + r per layer",
           _apply_vera, "adapter", VERA, _VERA),
    Method("adalora", "AdaLoRA: P·Λ·Q·x with the rank pruned by importance to an average target_r; "
           "trains r(d+k+1) per layer", adalora.apply, "adapter", ADALORA, _ADALORA),
    Method("full", "full fine-tuning: every parameter", strategies.apply_full, "model", quantizable=False),
    Method("head", "feature extraction: only the output head (untied from the embeddings)", strategies.apply_head,
           "model"),
    Method("partial", "partial fine-tuning: the top N blocks and named modules", strategies.apply_partial, "model",
           PARTIAL, quantizable=False, check=strategies.check_partial),
    Method("bottleneck", "bottleneck adapters (Houlsby/Pfeiffer): h + W_up·f(W_down·h + b_down) + b_up after "
           "attention and/or the FFN; trains 2dr + r + d per site", _apply_bottleneck, "adapter", BOTTLENECK,
           _BOTTLENECK),
    Method("prompt_tuning", "prompt tuning: k trainable vectors prepended to the input embeddings; trains k·d",
           _prompt_apply("prompt", False), "adapter", PROMPT, _PROMPTS, check=_check_no_projection("prompt_tuning")),
    Method("prefix_tuning", "prefix tuning: trainable keys/values at every layer (optionally from an MLP, folded "
           "when saved); trains l·L·2·d_kv", _prompt_apply("prefix", None), "adapter", PROMPT, _PROMPTS,
           check=_check_prefix("prefix_tuning", projection_ok=True)),
    Method("p_tuning_v2", "P-Tuning v2: a deep prompt at every layer, as key/value prefixes without "
           "reparameterisation; trains l·L·2·d_kv", _prompt_apply("prefix", False), "adapter", PROMPT, _PROMPTS,
           check=_check_prefix("p_tuning_v2", projection_ok=False)),
    Method("mix", "mixing weights: Σₙ λₙ·sₙ·Bₙ(Aₙx) over frozen LoRA adapters (mix.adapters); trains one λ "
           "per adapter (× layer or module with mix.granularity)", _apply_mix, "adapter", MIX, _LORA, save=_save_mix),
]}


OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "classify": Classify,
    "dreambooth": DreamBooth,
    "multitask": MultiTask,
}

QUANT_TYPES = ("none", "nf4", "fp4")


def sections() -> list[Section]:
    """Every method section once, in table order (TrainConfig's method sections)."""
    seen: dict[str, Section] = {}
    for m in METHODS.values():
        if m.section is not None:
            seen.setdefault(m.section.name, m.section)
    return list(seen.values())


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        close = difflib.get_close_matches(name, table, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {what} {name!r}{hint}; choose one of {', '.join(table)}")
    return table[name]


def get_method(name: str) -> Method:
    return _lookup(METHODS, name, "method")  # type: ignore[no-any-return]


def get_objective(name: str) -> type[Objective]:
    return _lookup(OBJECTIVES, name, "objective")  # type: ignore[no-any-return]


def apply_method(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    """The base model setting (``model.quantize``, or the method's alias: qlora = nf4), then
    ``cfg.method``'s apply. A 4-bit base (quantized here, or loaded from a 4-bit checkpoint) is
    refused for the methods that train the base's own weights (full, partial)."""
    from .quant.linear4bit import Linear4bit, quantize_base

    method = get_method(cfg.method)
    quant = cfg.model.quantize if cfg.model.quantize != "none" else method.base_quant
    if quant != "none" and not any(isinstance(m, Linear4bit) for m in model.modules()):
        if not method.quantizable:
            raise ValueError(f"model.quantize={quant!r}: method {method.name!r} trains the base weights themselves, "
                             "which a 4-bit base cannot hold; use an adapter method (or model.quantize=none)")
        quantize_base(model, quant)
    elif not method.quantizable and any(isinstance(m, Linear4bit) for m in model.modules()):
        raise ValueError(f"method {method.name!r} trains the base weights, but this model's linears are 4-bit "
                         "(a 4-bit checkpoint): use an adapter method, or load the 16-bit model")
    return method.apply(model, cfg, info)

