"""The token-summed causal cross-entropy, once (training, perplexity, the 4-bit merge report).

Labels follow the transformers convention: aligned with ``input_ids``, −100 = not scored; the token
at position t+1 is predicted at position t. Sums, not means: callers divide by the token count over
whatever they aggregate (an accumulation window, a data set), so every token weighs the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "token_loss_sum", "causal_loss_sum", "causal_loss_tokens"]

IGNORE_INDEX = -100  # the label value torch.nn.functional.cross_entropy ignores


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ cross-entropy over the positions whose label is not −100, in fp32 (bf16 logits sum exactly).

    logits (..., V) and labels (...) already aligned (any shift done by the caller)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def causal_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ next-token cross-entropy: logits (B, T, V) at t scored against labels (B, T) at t+1."""
    return token_loss_sum(logits[:, :-1], labels[:, 1:])


def causal_loss_tokens(labels: torch.Tensor) -> int:
    """How many tokens :func:`causal_loss_sum` scores: labels ≠ −100 after the one-position shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
