"""Replay mixing: general or old-task examples in every training batch (``data.replay_file``,
``data.replay_ratio``), against forgetting.

Each batch of ``train.batch_size`` rows holds k = max(1, round(batch_size · ratio)) replay rows and
batch_size − k target rows. An epoch is one pass over the target rows (their order is
``epoch_batches`` of the target set, as without replay); the replay rows are a separate stream,
one seeded permutation per pass over the replay file, consumed k per batch and continued across
epochs. Every index is a pure function of (seed, epoch, batch index), so a resumed run — which
recomputes the epoch's plan and skips the batches it consumed — sees exactly the uninterrupted
run's batches.

Rows: ``splits.train`` becomes target rows followed by replay rows; the plan's indices address that
list (indices ≥ n_target are replay rows).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

from ..data import epoch_batches, load_examples, tokenize_examples

__all__ = ["replay_batches", "mix", "batch_plan"]


def _replay_order(n: int, seed: int, cycle: int) -> list[int]:
    order = list(range(n))
    random.Random(f"deltatune-replay:{seed}:{cycle}").shuffle(order)  # string seed: platform-stable
    return order


def replay_batches(n_target: int, n_replay: int, batch_size: int, ratio: float, seed: int,
                   epoch: int) -> list[list[int]]:
    """Index batches over [target rows..., replay rows...] for ``epoch`` (see the module docstring)."""
    k = min(batch_size - 1, max(1, round(batch_size * ratio)))
    target = epoch_batches(n_target, batch_size - k, seed, epoch)
    out: list[list[int]] = []
    orders: dict[int, list[int]] = {}
    for j, tb in enumerate(target):
        start = (epoch * len(target) + j) * k  # replay rows consumed before this batch
        picked = []
        for p in range(start, start + k):
            cycle, pos = divmod(p, n_replay)
            if cycle not in orders:
                orders[cycle] = _replay_order(n_replay, seed, cycle)
            picked.append(n_target + orders[cycle][pos])
        out.append(tb + picked)
    return out


def mix(cfg: Any, objective: Any, splits: Any) -> Any:
    """``splits`` with the replay rows appended to ``train`` (unchanged when there is no replay)."""
    d = cfg.data
    if not d.replay_file or d.replay_ratio <= 0:
        return splits
    tok = getattr(objective, "tokenizer", None)
    if tok is None:
        raise ValueError(f"data.replay_file needs text rows; objective {cfg.objective!r} has no tokenizer")
    rows, _, _ = tokenize_examples(load_examples(d.replay_file, skip_bad_records=d.skip_bad_records).examples,
                                   tok, d.max_length, d.completion_only_loss)
    if not rows:
        raise ValueError(f"data.replay_file {d.replay_file}: no example with a loss token")
    k = min(cfg.train.batch_size - 1, max(1, round(cfg.train.batch_size * d.replay_ratio)))
    info = {**splits.info, "replay": {"file": d.replay_file, "rows": len(rows), "ratio": d.replay_ratio,
                                      "per_batch": k, "target_rows": len(splits.train)}}
    return dataclasses.replace(splits, train=list(splits.train) + rows, info=info)


def batch_plan(cfg: Any, splits: Any, epoch: int) -> list[list[int]]:
    """The loop's index batches for ``epoch``: plain ``epoch_batches``, or replay-mixed ones."""
    r = splits.info.get("replay") if isinstance(splits.info, dict) else None
    if r is None:
        return epoch_batches(len(splits.train), cfg.train.batch_size, cfg.train.seed, epoch)
    return replay_batches(r["target_rows"], r["rows"], cfg.train.batch_size, r["ratio"], cfg.train.seed, epoch)
