"""WiSE-FT (Wortsman et al. 2022): interpolate between the base and the fine-tuned model, θ₀ + α(θ − θ₀).

* Adapters: the weight change of every adapted layer is scaled, W₀ + α·ΔW (ΔW = s·BA for LoRA, the
  effective change for DoRA / VeRA / AdaLoRA as their ``delta`` gives it). :func:`merge_scaled`
  writes it into the base and removes the adapters (``deltatune merge --scale α``);
  :func:`scaled` does it for the duration of a ``with`` block and restores the exact base bits.
* Full / partial / head: every parameter that differs from the base, θ₀ + α(θ − θ₀), from the base's
  state dict: :func:`interpolate` (in place) and :func:`interpolated` (a ``with`` block).

α = 0 is the base, α = 1 the fine-tuned model; :func:`sweep` reports the target score and the
forgetting (reference loss increase, KL(p_base ‖ p_α) from the base's cached top-k) for several α
in one table (``deltatune wise-sweep``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["scaled", "merge_scaled", "interpolate", "interpolated", "sweep", "format_sweep"]


def _adapted(model: nn.Module) -> list[tuple[nn.Module, Callable[[], torch.Tensor]]]:
    """(base layer, ΔW thunk) for every adapted layer: LoRA (active adapters, summed) and single-adapter layers."""
    from .inject import lora_layers
    from .methods.single import SingleAdapterLayer

    out: list[tuple[nn.Module, Callable[[], torch.Tensor]]] = []
    for _, layer in lora_layers(model):
        names = [n for n in layer.active if n in layer.adapters]
        if names:
            def total(layer: Any = layer, names: list[str] = names) -> torch.Tensor:
                return torch.stack([layer.delta(n) for n in names]).sum(0)

            out.append((layer.base_layer, total))
    for m in model.modules():
        if isinstance(m, SingleAdapterLayer) and m.has_adapter():
            out.append((m.base_layer, m.delta))
    return out


def _check_unmerged(model: nn.Module) -> None:
    from .inject import _kinds_present, _refuse_unmergeable, lora_layers

    _refuse_unmergeable(_kinds_present(model), "scale the weight change (WiSE-FT)")
    if any(layer.merged for _, layer in lora_layers(model)) or any(getattr(m, "merged", False) is True
                                                                    for m in model.modules()):
        raise ValueError("WiSE-FT: adapters are merged; unmerge them first")


@contextlib.contextmanager
def scaled(model: nn.Module, alpha: float) -> Iterator[nn.Module]:
    """Inside the block the model computes W₀ + α·ΔW (adapters switched off, α·ΔW in the base
    weights); afterwards the base weights are restored bit for bit (a copy of the adapted layers'
    weights is held meanwhile)."""
    from .inject import disable_adapters
    from .methods.lora import add_to_weight, weight_of

    _check_unmerged(model)
    sites = _adapted(model)
    if not sites:
        raise ValueError("WiSE-FT: the model has no adapter with a weight change to scale")
    originals = [weight_of(base).detach().clone() for base, _ in sites]
    with torch.no_grad():
        deltas = [alpha * delta() for _, delta in sites]  # computed before any base weight moves (DoRA reads W₀)
        for (base, _), d in zip(sites, deltas):
            add_to_weight(base, d)
    try:
        with disable_adapters(model):
            yield model
    finally:
        with torch.no_grad():
            for (base, _), w in zip(sites, originals):
                weight_of(base).copy_(w)


def merge_scaled(model: nn.Module, alpha: float) -> nn.Module:
    """W₀ ← W₀ + α·ΔW in every adapted layer, adapters removed: the plain WiSE-FT model."""
    from .inject import unload
    from .methods.lora import add_to_weight

    _check_unmerged(model)
    sites = _adapted(model)
    if not sites:
        raise ValueError("WiSE-FT: the model has no adapter with a weight change to scale")
    with torch.no_grad():
        deltas = [alpha * delta() for _, delta in sites]
        for (base, _), d in zip(sites, deltas):
            add_to_weight(base, d)
    return unload(model, merge_adapters=False)


def interpolate(model: nn.Module, base_state: Mapping[str, torch.Tensor], alpha: float) -> nn.Module:
    """θ ← θ₀ + α(θ − θ₀) in place for every floating-point tensor of the model's state dict that the
    base state also has (same shape required). Computed in fp32, stored in the parameter's dtype."""
    state = model.state_dict()
    missing = [k for k, v in state.items() if v.is_floating_point() and k not in base_state]
    if missing:
        raise ValueError(f"WiSE-FT: the base has no tensor {missing[0]!r} (of {len(missing)}); is it the same model?")
    seen: set[int] = set()  # tied weights (embedding = output head) appear under two keys: move them once
    with torch.no_grad():
        for k, v in state.items():
            if not v.is_floating_point() or v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            b = base_state[k]
            if tuple(b.shape) != tuple(v.shape):
                raise ValueError(f"WiSE-FT: {k} is {tuple(v.shape)} in the fine-tuned model, {tuple(b.shape)} in the base")
            b32 = b.to(v.device, torch.float32)
            v.copy_((b32 + alpha * (v.float() - b32)).to(v.dtype))
    return model


@contextlib.contextmanager
def interpolated(model: nn.Module, base_state: Mapping[str, torch.Tensor], alpha: float) -> Iterator[nn.Module]:
    """:func:`interpolate` for the duration of the block; the fine-tuned weights come back exactly."""
    keep = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    interpolate(model, base_state, alpha)
    try:
        yield model
    finally:
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in keep:
                    v.copy_(keep[k])


def sweep(model: nn.Module, alphas: Sequence[float], score: Callable[[nn.Module], dict[str, float]],
          reference_rows: Sequence[Any], pad_id: int, *, base_state: Mapping[str, torch.Tensor] | None = None,
          top_k: int = 256, batch_size: int = 4) -> list[dict[str, Any]]:
    """One row per α: ``score(model)`` (the target metrics) and the forgetting at that α: reference
    loss increase and KL(p_base ‖ p_α) (mean/max over reference tokens; the base's top-k cached,
    so the KL is the lower-bound form of :mod:`deltatune.train.forgetting`).

    Adapters: ``model`` carries them (α scales ΔW). Full runs: ``model`` is the fine-tuned model and
    ``base_state`` the base's state dict."""
    from .train.forgetting import cache_base, cached_measure

    def at(alpha: float) -> contextlib.AbstractContextManager[nn.Module]:
        return scaled(model, alpha) if base_state is None else interpolated(model, base_state, alpha)

    with at(0.0):
        cache = cache_base(model, reference_rows, pad_id, top_k, batch_size)
    rows = []
    for alpha in alphas:
        with at(alpha):
            m = cached_measure(model, reference_rows, cache, pad_id, batch_size)
            row: dict[str, Any] = {"alpha": alpha, **score(model)}
        row.update({"reference_loss": m["adapted"]["loss"], "reference_loss_increase": m["adapted"]["loss"] - m["base"]["loss"],
                    "kl_base_to_adapted_mean": m["kl_mean"], "kl_base_to_adapted_max": m["kl_max"]})
        rows.append(row)
    return rows


def format_sweep(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The sweep as a Markdown table (every numeric column; α first)."""
    if not rows:
        return []
    cols = ["alpha"] + [k for k in rows[0] if k != "alpha"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return lines


def sweep_cli(args: Any) -> list[dict[str, Any]]:
    """``deltatune wise-sweep``: load the base (and the adapter or the fine-tuned model), build the
    target scorer (held-out loss, and exact match unless ``--no-generate``) and run :func:`sweep`."""
    from .data import examples_from_records, load_examples, prompt_and_reference, tokenize_examples
    from .io import load_adapter
    from .models import load_model
    from .objectives.causal_lm import eval_loss
    from .tasks import make_task, score_exact_match
    from .train.evaluate import generate_texts
    from .train.forgetting import ForgettingConfig
    from .train.reference import reference_rows
    from .train.runtime import Runtime

    model, tok = load_model(args.model)
    base_state = None
    if args.adapter:
        load_adapter(model, args.adapter)
    else:
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model, tok = load_model(args.finetuned)
    if args.data:
        examples = load_examples(args.data).examples
    else:
        _, recs = make_task(seed=0)
        examples = examples_from_records([(f"<built-in task> (eval {i})", r) for i, r in enumerate(recs)], "chat").examples
    rows, _, _ = tokenize_examples(examples, tok, 1024)
    pairs = [p for p in map(prompt_and_reference, examples) if p is not None]
    rt = Runtime.create(False, next(model.parameters()).device)
    pad = int(tok.pad_token_id)

    def score(m: nn.Module) -> dict[str, float]:
        out = {"target_loss": eval_loss(m, rows, pad, 8, rt)["loss"]}
        if not args.no_generate and pairs:
            preds = generate_texts(m, tok, [p for p, _ in pairs], max_new_tokens=args.max_new_tokens, batch_size=40)
            out["exact_match"] = score_exact_match(preds, [r for _, r in pairs])
        return out

    ref = reference_rows(ForgettingConfig(reference_file=args.reference_file), tok)
    alphas = [float(a) for a in str(args.alphas).split(",") if a.strip()]
    return sweep(model, alphas, score, ref, pad, base_state=base_state)
