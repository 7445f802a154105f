"""Evaluation: perplexity and next-token KL for the forgetting report; generation (greedy, batched)
lives in :mod:`deltatune.generate` and is re-exported here."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Generation moved to deltatune.generate (one module for eval, the CLI and the server); these
# names stay importable from here for existing callers.
from ..generate import (
    Messages,  # noqa: F401 (re-exported)
    encode_prompt,
    generate_texts,
    greedy_generate_ids,
    stop_token_ids,
)
from ..losses import causal_loss_sum, causal_loss_tokens


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean next-token loss and its exp over ``batches``.

    Each batch holds ``input_ids`` and ``labels`` (B, T) and optionally ``attention_mask``; labels
    follow the transformers convention (aligned with input_ids, shifted here, -100 = ignore).
    Weighting by token count, not by batch, makes the result independent of how data is batched.
    Returns {"loss", "ppl", "tokens"}.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            labels = batch["labels"].to(device)  # (B, T): token t+1 is predicted at t
            logits = model(
                input_ids=input_ids, attention_mask=None if mask is None else mask.to(device)
            ).logits  # (B, T, V)
            total += causal_loss_sum(logits, labels).item()
            count += causal_loss_tokens(labels)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no labelled tokens (all labels are -100)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": float(count)}


def next_token_kl(
    logits_base: torch.Tensor, logits_adapted: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """Mean over unmasked positions of KL(p_base ‖ p_adapted) = Σ_v p_b(v)·(log p_b(v) − log p_a(v)).

    logits_*: (..., V), e.g. (B, T, V); mask: (...) with nonzero/True at positions to count (None:
    all). This is the forgetting measure of MISSION §1: for an adapter, base logits come from the
    same model with the adapter disabled.
    """
    if logits_base.shape != logits_adapted.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_base.shape)} vs {tuple(logits_adapted.shape)}")
    log_p = F.log_softmax(logits_base.float(), dim=-1)  # (..., V)
    log_q = F.log_softmax(logits_adapted.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    if mask is None:
        return float(kl.mean())
    m = mask.to(kl.device).bool()
    if m.shape != kl.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match positions {tuple(kl.shape)}")
    if not bool(m.any()):
        raise ValueError("next_token_kl: mask selects no positions")
    return float(kl[m].mean())


__all__ = [
    "encode_prompt",
    "generate_texts",
    "greedy_generate_ids",
    "next_token_kl",
    "perplexity",
    "stop_token_ids",
]
