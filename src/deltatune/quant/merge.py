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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear4bit import Linear4bit

__all__ = ["merged_4bit_copy", "merge_error_report", "reference_batches", "merge_into_4bit_checkpoint",
           "format_merge_report"]


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
    tgt = labels[:, 1:]  # (B, T-1): the token each position predicts
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                         ignore_index=-100, reduction="sum")
    return mask, ce, (tgt != -100).sum()


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
    from ..inject import disable_adapters

    merged = merged if merged is not None else merged_4bit_copy(model)
    was = model.training, merged.training
    model.eval()
    merged.eval()
    max_diff = max_adapter = 0.0
    abs_sum = 0.0
    agree = positions = 0
    ce = {"base": 0.0, "adapter": 0.0, "merged": 0.0}
    n_loss = 0
    hf: Any = model
    try:
        for batch in batches:
            dev = next(model.parameters()).device
            b = {k: v.to(dev) for k, v in batch.items()}
            kw = {"input_ids": b["input_ids"], "attention_mask": b.get("attention_mask")}
            logits = {"adapter": hf(**kw).logits.float(), "merged": merged(**kw).logits.float()}
            with disable_adapters(model):
                logits["base"] = hf(**kw).logits.float()
            for key, lg in logits.items():
                mask, s, count = _token_stats(lg, b)  # mask (B, T) and count: the same for all three
                ce[key] += float(s)
            n_loss += int(count)
            diff = (logits["merged"] - logits["adapter"]).abs()[mask]  # (N, V) attended positions
            max_diff = max(max_diff, float(diff.max()) if diff.numel() else 0.0)
            abs_sum += float(diff.sum())
            positions += int(mask.sum())
            agree += int((logits["merged"].argmax(-1) == logits["adapter"].argmax(-1))[mask].sum())
            eff = (logits["adapter"] - logits["base"]).abs()[mask]
            max_adapter = max(max_adapter, float(eff.max()) if eff.numel() else 0.0)
    finally:
        model.train(was[0])
        merged.train(was[1])
    if positions == 0:
        raise ValueError("merge_error_report: the reference batches hold no token")
    vocab = next(iter(logits.values())).shape[-1]
    ppl = {k: math.exp(min(v / max(1, n_loss), 50.0)) for k, v in ce.items()}
    report: dict[str, Any] = {
        "tokens": positions,
        "loss_tokens": n_loss,
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": abs_sum / (positions * vocab),
        "top1_agreement": agree / positions,
        "max_abs_logit_adapter": max_adapter,
        "ppl_base": ppl["base"],
        "ppl_adapter": ppl["adapter"],
        "ppl_merged": ppl["merged"],
        "ppl_change": ppl["merged"] - ppl["adapter"],
        "ppl_change_percent": 100.0 * (ppl["merged"] / ppl["adapter"] - 1.0),
    }
    report.update(_weight_stats(model, merged))
    return report


def reference_batches(
    tokenizer: Any,
    data: str | os.PathLike[str] | None = None,
    *,
    max_length: int = 256,
    batch_size: int = 4,
    num_examples: int = 16,
) -> list[dict[str, Tensor]]:
    """Reference text for :func:`merge_error_report`: the first ``num_examples`` records of a data
    file (any format ``deltatune.train.data`` reads), or of the built-in task's held-out split;
    every token is scored (not only completions)."""
    from ..tasks import make_task
    from ..train.data import collate, examples_from_records, load_examples, tokenize_examples

    if data is not None:
        examples = load_examples(Path(data)).examples[:num_examples]
    else:
        _, recs = make_task()  # the default run's held-out split: never trained on
        recs = recs[:num_examples]
        examples = examples_from_records([(f"<built-in task> (eval {i})", r) for i, r in enumerate(recs)], "chat").examples
    rows, _, _ = tokenize_examples(examples, tokenizer, max_length, completion_only_loss=False)
    if not rows:
        raise ValueError(f"{data or 'built-in task'}: no reference text")
    pad = tokenizer.pad_token_id
    return [collate(cast(Any, rows[i : i + batch_size]), pad) for i in range(0, len(rows), batch_size)]


def merge_into_4bit_checkpoint(
    model: nn.Module, tokenizer: Any, out: str | os.PathLike[str], batches: Iterable[Mapping[str, Tensor]]
) -> dict[str, Any]:
    """Merge ``model``'s adapters into its 4-bit base, measure the error on ``batches``, write the
    merged model to ``out`` as a bitsandbytes-layout 4-bit checkpoint plus ``merge_report.json``,
    and return the report.  ``model`` itself stays unmerged."""
    import json

    from .checkpoint import save_4bit_checkpoint

    merged = merged_4bit_copy(model)
    report = merge_error_report(model, batches, merged)
    target = save_4bit_checkpoint(merged, tokenizer, out)
    (target / "merge_report.json").write_text(json.dumps(report, indent=2))
    return report


def format_merge_report(report: Mapping[str, Any]) -> list[str]:
    """Three lines for ``deltatune merge --into-4bit``."""
    lines = [
        f"merge into 4 bits: max |Δ logit| {report['max_abs_logit_diff']:.4g} vs the unmerged adapter "
        f"(the adapter itself moves logits by up to {report['max_abs_logit_adapter']:.4g}); "
        f"top-1 agreement {100 * report['top1_agreement']:.2f}%",
        f"perplexity on {report['loss_tokens']:,d} reference tokens: base {report['ppl_base']:.4f}, "
        f"adapter {report['ppl_adapter']:.4f}, merged 4-bit {report['ppl_merged']:.4f} "
        f"({report['ppl_change_percent']:+.3f}%)",
    ]
    if report.get("layers_measured"):
        lines.append(f"ΔW kept by requantization: {100 * report['delta_retained_mean']:.1f}% on average "
                     f"(min {100 * report['delta_retained_min']:.1f}%) over {report['layers_measured']} layers; "
                     f"requantization error {report['requant_error_over_delta_mean']:.2f}·‖ΔW‖")
    return lines
