"""KL-to-base penalty as a training hook: λ·mean_t KL(p_base ‖ p_θ) of next-token distributions on
the forgetting reference set (:mod:`deltatune.train.reference`).

Each call takes the next ``batch_size`` reference rows (a cursor that cycles through the set; it is
in the checkpoint, so a resumed run sees the same rows). The base distribution comes, as for the
forgetting report (:mod:`deltatune.train.forgetting`), from the same weights with the adapters
disabled (adapter methods: one extra no-grad forward per call), or from the base's top-k log-probs
cached before training (full/partial/head: the tail-merged KL, a lower bound of the exact one,
differentiable in p_θ). The loop calls ``extra_loss`` once per micro-batch and weights each by
1/len(window), so a window of g micro-batches averages the penalty over g·batch_size rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX, Tokenized, collate
from ..train.forgetting import BaseCache, cache_base, token_kl, topk_kl
from .config import KlConfig

__all__ = ["KlHook"]


class KlHook:
    name = "kl"

    def __init__(self, cfg: KlConfig, rows: Sequence[Tokenized], pad_id: int, *, adapters: bool,
                 model: nn.Module | None = None, top_k: int = 256) -> None:
        if not rows:
            raise ValueError("regularize.kl: the reference set is empty")
        self.cfg, self.rows, self.pad, self.adapters = cfg, list(rows), pad_id, adapters
        self.cursor = 0  # rows consumed so far (mod len(rows))
        self.cache: list[BaseCache] = []
        if not adapters:  # cache the base per penalty batch now, while the weights are the base's
            if model is None:
                raise ValueError("regularize.kl for a weight-changing method needs the model before training")
            self.cache = [cache_base(model, [r], pad_id, top_k, 1) for r in self.rows]

    def _next(self) -> list[int]:
        n = len(self.rows)
        idx = [(self.cursor + i) % n for i in range(min(self.cfg.batch_size, n))]
        self.cursor = (self.cursor + len(idx)) % n
        return idx

    def penalty(self, model: nn.Module) -> torch.Tensor:
        inner = getattr(model, "module", model)  # DDP keeps the model as .module
        idx = self._next()
        batch = collate(cast(Any, [self.rows[i] for i in idx]), self.pad)
        device = next(inner.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        keep = batch["labels"][:, 1:].to(device) != IGNORE_INDEX  # (B, T-1)
        log_q = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)  # (N, V)
        if self.adapters:
            from ..inject import disable_adapters

            with torch.no_grad(), disable_adapters(inner):
                log_p = F.log_softmax(inner(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float(), -1)
            kl = token_kl(log_p, log_q)
        else:
            c = [self.cache[i] for i in idx]  # rows in batch order = positions in keep order
            vals, tid, tail = (torch.cat(t).to(device) for t in zip(*((x.vals, x.idx, x.log_tail) for x in c)))
            kl = topk_kl(vals, tid, tail, log_q)[0]
        return self.cfg.weight * kl.mean()

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.penalty(model)

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor = int(state.get("cursor", 0))

    def report(self) -> dict[str, Any]:
        return {"weight": self.cfg.weight, "reference_rows": len(self.rows), "batch_size": self.cfg.batch_size,
                "base": "adapters disabled (exact)" if self.adapters else "cached top-k (lower-bound KL)"}


