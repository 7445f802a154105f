"""The dispatch tables: training methods (``METHODS``) and objectives (``OBJECTIVES``).

``deltatune train --set method=NAME``, ``--help`` and the README's method table read ``METHODS``.
Each ``apply(model, cfg, info)`` takes the loaded model, the whole ``TrainConfig`` (passed as the
config object, never exploded) and the run's :class:`~deltatune.train.hooks.RunInfo`; it changes
the model in place so that exactly the parameters the method trains have ``requires_grad=True``
and returns the method's training hooks (AdaLoRA's rank allocator; most methods have none).

``OBJECTIVES`` maps ``objective: NAME`` to an :class:`~deltatune.objectives.base.Objective`
subclass; an objective with a ``Config`` dataclass gets a ``TrainConfig`` section of its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .objectives.base import Objective
from .objectives.causal_lm import CausalLM
from .objectives.multitask import MultiTask
from .train.hooks import Hook, RunInfo

__all__ = ["Method", "METHODS", "OBJECTIVES", "method_names", "get_method", "get_objective", "block_list",
           "untie_output_head"]


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # one line for --help and the README table: Δf(x) and what trains
    apply: Callable[[nn.Module, Any, RunInfo], list[Hook]]
    saves: str  # "adapter" (PEFT-format adapter dir) or "model" (full HF checkpoint)
    # Writes the method's own files into the run directory instead of the default for `saves` (mix).
    save: Callable[[nn.Module, Path], None] | None = None


def _apply_lora(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    from .inject import inject

    inject(model, cfg.lora)
    return []


def _apply_dora(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    import dataclasses

    from .inject import inject

    inject(model, dataclasses.replace(cfg.lora, use_dora=True))
    return []


def _apply_qlora(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    from .inject import inject
    from .quant.linear4bit import quantize_model

    # The frozen base goes to NF4 (double-quantized); embeddings and the output head keep their
    # dtype. Compute runs in the dtype the model was loaded in (bf16 where the hardware has it:
    # bf16 matmuls on a CPU without AVX512-BF16 are far slower than fp32).
    compute = next(model.parameters()).dtype
    quantize_model(model, compute_dtype=compute if compute.is_floating_point else torch.float32)
    # transformers loads weights as views of the checkpoint's mmap; the kept embedding/norms would
    # hold the whole mapping, with every page quantize_model read, resident (measured: +300 MiB RSS
    # on SmolLM2-135M). Own copies release it.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()
    inject(model, cfg.lora)
    return []


def _apply_vera(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    from .methods.vera import inject_vera

    inject_vera(model, cfg.vera)
    return []


def _apply_adalora(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    from .methods import adalora

    return adalora.apply(model, cfg, info)  # the rank allocator and the orthogonality regulariser


def _apply_full(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    model.requires_grad_(True)
    return []


def untie_output_head(model: nn.Module) -> nn.Module | None:
    """Give the output head its own weight when it shares the input embedding's (SmolLM2, GPT-2),
    so training the head leaves the embeddings — and thus the features — untouched."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    emb = get_in() if callable(get_in) else None
    if head is None:
        return None
    if emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        config: Any = getattr(model, "config", None)
        if config is not None:
            config.tie_word_embeddings = False
    return head


def _apply_head(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    model.requires_grad_(False)
    head = untie_output_head(model)
    if head is None:
        raise ValueError(f"method 'head': {type(model).__name__} has no output head (get_output_embeddings())")
    head.requires_grad_(True)
    return []


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList in the model (layers / h / layer / blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks (nn.ModuleList) for method 'partial'")
    return best


def _apply_partial(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    model.requires_grad_(False)
    pcfg = cfg.partial
    _, blocks = block_list(model)
    n = min(pcfg.top_n_layers, len(blocks))
    for block in list(blocks)[len(blocks) - n:]:
        block.requires_grad_(True)
    for name in pcfg.modules:
        hits = [m for path, m in model.named_modules() if path == name or path.endswith("." + name)]
        if not hits:
            names = sorted({p.split(".")[-1] for p, _ in model.named_modules() if p})
            raise ValueError(f"partial.modules: {name!r} matches no module; names include {names[:30]}")
        if name.endswith(("lm_head", "embed_tokens", "wte")):
            untie_output_head(model)
        for m in hits:
            m.requires_grad_(True)
    return []


def _apply_bottleneck(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    from .methods import bottleneck

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
        import dataclasses

        from .methods import prompts

        fixed: dict[str, Any] = {"kind": kind} if projection is None else {"kind": kind, "projection": projection}
        # init='text' tokenizes with the run's own tokenizer unless prompt.tokenizer names one.
        tokenizer = info.processor if cfg.prompt.tokenizer is None else None
        prompts.inject(model, dataclasses.replace(cfg.prompt, **fixed), tokenizer=tokenizer)
        return []

    return apply


METHODS: dict[str, Method] = {
    "lora": Method("lora", "LoRA: (α/r)·B(A·x) on the target linears; trains r(d+k) per layer", _apply_lora, "adapter"),
    "qlora": Method("qlora", "QLoRA: LoRA over an NF4 (double-quantized) frozen base", _apply_qlora, "adapter"),
    "dora": Method("dora", "DoRA: m·(W₀ + (α/r)·BA)/‖W₀ + (α/r)·BA‖_c · x − W₀x (the lora: section); trains r(d+k) + d "
                   "per layer", _apply_dora, "adapter"),
    "vera": Method("vera", "VeRA: Λ_b·B·Λ_d·A·x, A and B frozen, random, shared by all layers; trains d_out + r per layer",
                   _apply_vera, "adapter"),
    "adalora": Method("adalora", "AdaLoRA: P·Λ·Q·x with the rank pruned by importance to an average target_r; "
                      "trains r(d+k+1) per layer", _apply_adalora, "adapter"),
    "full": Method("full", "full fine-tuning: every parameter", _apply_full, "model"),
    "head": Method("head", "feature extraction: only the output head (untied from the embeddings)", _apply_head, "model"),
    "partial": Method("partial", "partial fine-tuning: the top N blocks and named modules", _apply_partial, "model"),
    "bottleneck": Method("bottleneck", "bottleneck adapters (Houlsby/Pfeiffer): h + W_up·f(W_down·h + b_down) + b_up after "
                         "attention and/or the FFN; trains 2dr + r + d per site", _apply_bottleneck, "adapter"),
    "prompt_tuning": Method("prompt_tuning", "prompt tuning: k trainable vectors prepended to the input embeddings; "
                            "trains k·d", _prompt_apply("prompt", False), "adapter"),
    "prefix_tuning": Method("prefix_tuning", "prefix tuning: trainable keys/values at every layer (optionally from an "
                            "MLP, folded when saved); trains l·L·2·d_kv", _prompt_apply("prefix", None), "adapter"),
    "p_tuning_v2": Method("p_tuning_v2", "P-Tuning v2: a deep prompt at every layer, as key/value prefixes without "
                          "reparameterisation; trains l·L·2·d_kv", _prompt_apply("prefix", False), "adapter"),
    "mix": Method("mix", "mixing weights: Σₙ λₙ·sₙ·Bₙ(Aₙx) over frozen LoRA adapters (mix.adapters); trains one λ "
                  "per adapter (× layer or module with mix.granularity)", _apply_mix, "adapter", save=_save_mix),
}


OBJECTIVES: dict[str, type[Objective]] = {
    "causal_lm": CausalLM,
    "multitask": MultiTask,
}


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def get_method(name: str) -> Method:
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def get_objective(name: str) -> type[Objective]:
    if name not in OBJECTIVES:
        import difflib

        close = difflib.get_close_matches(name, OBJECTIVES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown objective {name!r}{hint}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
