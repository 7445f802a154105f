"""Batches: right-padded collation and a deterministic, resumable batch order."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from deltatune.losses import IGNORE_INDEX

if TYPE_CHECKING:

    pass


__all__ = ["IGNORE_INDEX", "collate", "count_loss_tokens", "epoch_order", "epoch_batches"]

# ---------------------------------------------------------------------------------------------
# Batching


def collate(
    batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int | None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 1 on real tokens. All (B, T) int64."""
    if pad_token_id is None:
        raise ValueError(
            "collate: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)"
        )
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        if len(r["labels"]) != n:
            raise ValueError(f"collate: row {i} has {n} input_ids but {len(r['labels'])} labels")
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens that contribute to the causal-LM loss: labels ≠ -100 after the one-position shift
    (``labels[:, 1:]``). The loop sums per-token losses over a whole accumulation window and
    divides by this total, so every token weighs the same whatever the batch it landed in."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (n, seed, epoch): a resumed run recomputes
    the same order and skips the batches it already consumed."""
    order = list(range(n))
    # A string seed goes through SHA-512 in `random`, independent of PYTHONHASHSEED and platform.
    random.Random(f"deltatune:{seed}:{epoch}").shuffle(order)
    return order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = False
) -> list[list[int]]:
    """:func:`epoch_order` cut into batches of ``batch_size`` indices (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1, got {batch_size}")
    order = epoch_order(n, seed, epoch)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
