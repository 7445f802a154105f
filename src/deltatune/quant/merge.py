"""Merging adapters into a 4-bit base, with the error that merging adds measured (MISSION §9).

Merging LoRA into an NF4 base is not exact: each Linear4bit is dequantized, ΔW = (α/r)·BA is
added, and the sum is quantized again (``LoraLayer.merge`` → ``Linear4bit.requantize_``), so
the merged weight is Q(Ŵ + ΔW) instead of Ŵ + ΔW, and a ΔW smaller than half an NF4 step of its
block is partly rounded away.  :func:`merge_error_report` measures what that costs on reference
text: max |Δ logit| and the perplexity of the unmerged (adapter) model vs the merged 4-bit one,
next to the base model's, plus how much of each ΔW survived requantization.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import causal_loss_sum, causal_loss_tokens
from .linear4bit import Linear4bit

__all__ = ["merged_4bit_copy", "merge_error_report", "merge_error_reports", "merge_into_4bit_checkpoint",
           "quantize_like", "format_merge_report"]


def merged_4bit_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its active adapters merged into the 4-bit base and the wrappers
    removed (``deltatune.unload`` of a deep copy); ``model`` itself is left unmerged.

    Memory: one more copy of the 4-bit model.  The copy is what ``save_4bit_checkpoint`` writes.
    """
    from ..inject import lora_layers, unload

    if not any(isinstance(layer.base_layer, Linear4bit) for _, layer in lora_layers(model)):
        raise ValueError("no adapter wraps a 4-bit layer: nothing to merge into 4 bits "
                         "(quantize the base first: deltatune.quant.quantize_model, or load a 4-bit checkpoint)")
    return unload(copy.deepcopy(model))


def _weight_stats(model: nn.Module, merged: nn.Module) -> dict[str, float]:
    """How much of each plain-LoRA ΔW the requantized weight kept, over the 4-bit layers.

    retained = ⟨Ŵ' − Ŵ, ΔW⟩ / ‖ΔW‖²  (1: all of ΔW survived, 0: rounded away), and
    error = ‖Ŵ' − (Ŵ + ΔW)‖ / ‖ΔW‖  (requantization error relative to the adapter's size),
    with Ŵ the dequantized base, Ŵ' the dequantized merged weight, all (out, in) fp32.
    """
    from ..inject import lora_layers
    from ..methods.lora import LoraLayer

    retained: list[float] = []
    errors: list[float] = []
    for path, layer in lora_layers(model):
        base = layer.base_layer
        if type(layer) is not LoraLayer or not isinstance(base, Linear4bit) or layer.merged:
            continue  # DoRA's merged weight is not Ŵ + ΔW; merged layers have no unmerged Ŵ here
        names = list(layer.active)
        if not names:
            continue
        delta = sum((layer.delta(n).float() for n in names), torch.zeros(()))  # (out, in)
        after = merged.get_submodule(path)
        assert isinstance(after, Linear4bit)
        w0 = base.dequantized_weight(torch.float32)
        moved = after.dequantized_weight(torch.float32) - w0  # (out, in)
        norm2 = float((delta * delta).sum())
        if norm2 == 0.0:
            continue
        retained.append(float((moved * delta).sum()) / norm2)
        errors.append(float((moved - delta).norm()) / math.sqrt(norm2))
    if not retained:
        return {"layers_measured": 0}
    return {
        "layers_measured": len(retained),
        "delta_retained_mean": sum(retained) / len(retained),
        "delta_retained_min": min(retained),
        "requant_error_over_delta_mean": sum(errors) / len(errors),
    }


def _token_stats(logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(positions mask (B, T) bool, Σ next-token CE, loss-token count) for one batch."""
    mask = batch["attention_mask"].bool() if "attention_mask" in batch else torch.ones_like(batch["input_ids"]).bool()
    labels = batch.get("labels")
    if labels is None:
        labels = batch["input_ids"].masked_fill(~mask, -100)
    return mask, causal_loss_sum(logits, labels), torch.tensor(causal_loss_tokens(labels))


@torch.no_grad()
def merge_error_report(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], merged: nn.Module | None = None
) -> dict[str, Any]:
    """Compare the unmerged adapter model with the model merged into its 4-bit base.

    model: adapters over Linear4bit layers, unmerged.  batches: dicts with ``input_ids`` (B, T)
    and optionally ``attention_mask`` and ``labels`` (default: every attended token).  merged:
    the merged model (default ``merged_4bit_copy(model)``).  Returns ``max_abs_logit_diff`` and
    ``mean_abs_logit_diff`` (fp32, attended positions), ``top1_agreement`` (same argmax),
    ``max_abs_logit_adapter`` (|adapter − base|, the change merging should keep),
    ``ppl_base`` / ``ppl_adapter`` / ``ppl_merged``, ``ppl_change`` (merged − adapter) and
    ``ppl_change_percent``, ``tokens``, and the ΔW retention statistics of the 4-bit layers.
    """
    merged = merged if merged is not None else merged_4bit_copy(model)
    return merge_error_reports(model, batches, {"merged": merged})["merged"]


@torch.no_grad()
def merge_error_reports(
    model: nn.Module, batches: Iterable[Mapping[str, Tensor]], merged: Mapping[str, nn.Module]
) -> dict[str, dict[str, Any]]:
    """:func:`merge_error_report` for several merged candidates in one pass: the adapter and base
    forwards are shared.  Returns one report per key of ``merged``."""
    from ..inject import disable_adapters

    models = {"adapter": model, **merged}
    was = {k: m.training for k, m in models.items()}
    for m in models.values():
        m.eval()
    stats = {k: {"max": 0.0, "sum": 0.0, "agree": 0} for k in merged}
    ce = dict.fromkeys(["base", *models], 0.0)
    n_loss = positions = 0
    max_adapter = 0.0
    hf: Any = model
    try:
        for batch in batches:
            dev = next(model.parameters()).device
            b = {k: v.to(dev) for k, v in batch.items()}
            kw = {"input_ids": b["input_ids"], "attention_mask": b.get("attention_mask")}
            logits = {k: m(**kw).logits.float() for k, m in models.items()}  # (B, T, V) each
            with disable_adapters(model):
                logits["base"] = hf(**kw).logits.float()
            for key, lg in logits.items():
                mask, s, count = _token_stats(lg, b)  # mask (B, T) and count: the same for all
                ce[key] += float(s)
            n_loss += int(count)
            positions += int(mask.sum())
            ref = logits["adapter"]
            for key, st in stats.items():
                diff = (logits[key] - ref).abs()[mask]  # (N, V) attended positions
                st["max"] = max(st["max"], float(diff.max()) if diff.numel() else 0.0)
                st["sum"] += float(diff.sum())
                st["agree"] += int((logits[key].argmax(-1) == ref.argmax(-1))[mask].sum())
            eff = (ref - logits["base"]).abs()[mask]
            max_adapter = max(max_adapter, float(eff.max()) if eff.numel() else 0.0)
    finally:
        for k, m in models.items():
            m.train(was[k])
    if positions == 0:
        raise ValueError("merge_error_report: the reference batches hold no token")
    vocab = ref.shape[-1]
    ppl = {k: math.exp(min(v / max(1, n_loss), 50.0)) for k, v in ce.items()}
    reports: dict[str, dict[str, Any]] = {}
    for key, st in stats.items():
        reports[key] = {
            "tokens": positions,
            "loss_tokens": n_loss,
            "max_abs_logit_diff": st["max"],
            "mean_abs_logit_diff": st["sum"] / (positions * vocab),
            "top1_agreement": st["agree"] / positions,
            "max_abs_logit_adapter": max_adapter,
            "ppl_base": ppl["base"],
            "ppl_adapter": ppl["adapter"],
            "ppl_merged": ppl[key],
            "ppl_change": ppl[key] - ppl["adapter"],
            "ppl_change_percent": 100.0 * (ppl[key] / ppl["adapter"] - 1.0),
            **_weight_stats(model, merged[key]),
        }
    return reports


def quantize_like(model16: nn.Module, reference: nn.Module) -> nn.Module:
    """Quantize, in place, every linear of ``model16`` that is a :class:`Linear4bit` in ``reference``
    (same path, or ``<path>.base_layer`` under an adapter), with that layer's block size, double
    quantization, quant type and compute dtype.  Returns ``model16``."""
    for path, q in list(reference.named_modules()):
        if not isinstance(q, Linear4bit):
            continue
        path = path.removesuffix(".base_layer")
        lin = model16.get_submodule(path)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{path!r} is a {type(lin).__name__} in the 16-bit model, not a linear to quantize")
        s = q.quant_state
        parent, _, child = path.rpartition(".")
        setattr(model16.get_submodule(parent) if parent else model16, child,
                Linear4bit.from_linear(lin, s.block_size, s.nested, s.quant_type, q.compute_dtype))
    return model16


def merge_into_4bit_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    out: str | os.PathLike[str],
    batches: Sequence[Mapping[str, Tensor]],
    base16: nn.Module | None = None,
) -> dict[str, Any]:
    """Merge ``model``'s adapters into a 4-bit base, measure the error on ``batches``, write the
    merged model to ``out`` as a bitsandbytes-layout 4-bit checkpoint plus ``merge_report.json``,
    and return the report.  ``model`` itself stays unmerged.

    Two ways to get a 4-bit merged weight, both measured against the unmerged ``model``:
    ``requantize``: Q(Ŵ + ΔW), always possible; a ΔW under half an NF4 step is erased, because
    Ŵ sits exactly on a level.  ``from_16bit``: Q(W + ΔW) from the 16-bit base ``base16`` (the same
    adapters loaded on it; consumed), quantized like ``model``: W lies between levels, so ΔW moves
    codes in proportion to its size, at the price of fresh rounding noise.  The one with the lower
    mean |Δ logit| is written; the report carries both (``strategies``) and ``strategy``.
    """
    from ..inject import unload
    from .checkpoint import save_4bit_checkpoint

    candidates = {"requantize": merged_4bit_copy(model)}
    if base16 is not None:
        candidates["from_16bit"] = quantize_like(unload(base16), model)
    reports = merge_error_reports(model, batches, candidates)
    best = min(reports, key=lambda k: reports[k]["mean_abs_logit_diff"])
    report: dict[str, Any] = {"strategy": best, **reports[best]}
    if len(reports) > 1:
        report["strategies"] = reports
    from ..fsutil import dumps_json

    # The report goes inside the same atomic directory: the checkpoint and its report appear together.
    save_4bit_checkpoint(candidates[best], tokenizer, out,
                         extra_files={"merge_report.json": dumps_json(report, indent=2).encode()})
    return report


_STRATEGY = {"requantize": "Q(Ŵ + ΔW), requantized from the 4-bit base",
             "from_16bit": "Q(W + ΔW), quantized from the 16-bit base"}


def format_merge_report(report: Mapping[str, Any]) -> list[str]:
    """Lines for ``deltatune merge --into-4bit``."""
    lines = [
        f"merge into 4 bits ({_STRATEGY.get(report.get('strategy', 'requantize'), '?')}): max |Δ logit| "
        f"{report['max_abs_logit_diff']:.4g} vs the unmerged adapter (the adapter itself moves logits by up to "
        f"{report['max_abs_logit_adapter']:.4g}); top-1 agreement {100 * report['top1_agreement']:.2f}%",
        f"perplexity on {report['loss_tokens']:,d} reference tokens: base {report['ppl_base']:.4f}, "
        f"adapter {report['ppl_adapter']:.4f}, merged 4-bit {report['ppl_merged']:.4f} "
        f"({report['ppl_change_percent']:+.3f}%)",
    ]
    if report.get("layers_measured"):
        lines.append(f"ΔW kept: {100 * report['delta_retained_mean']:.1f}% on average "
                     f"(min {100 * report['delta_retained_min']:.1f}%) over {report['layers_measured']} layers; "
                     f"weight error {report['requant_error_over_delta_mean']:.2f}·‖ΔW‖")
    for name, other in (report.get("strategies") or {}).items():
        if name != report.get("strategy"):
            lines.append(f"not written: {_STRATEGY.get(name, name)}: max |Δ logit| {other['max_abs_logit_diff']:.4g}, "
                         f"mean {other['mean_abs_logit_diff']:.3g} (chosen: {report['mean_abs_logit_diff']:.3g}), "
                         f"merged perplexity {other['ppl_merged']:.4f}")
    return lines
