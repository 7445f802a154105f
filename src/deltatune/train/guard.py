"""Divergence guard: a run whose loss or gradient stops being finite is stopped with a diagnosis.

Without it ``train.lr=1e30`` (or a poisoned batch) ran to the end, wrote NaN checkpoints over the
good ones and an all-NaN adapter, and exited 0; ``train.lr=1e6`` collapsed the model to a uniform
distribution (loss stuck at ln V, gradient exactly 0) without a word.

The loop calls :meth:`DivergenceGuard.check_step` after backward (and clipping) and *before*
``optimizer.step``, so a bad step never reaches the weights, and :meth:`check_params` before
every checkpoint, so a checkpoint is always finite: the last one on disk is the last good state.
Both raise :class:`DivergenceError` naming the step, the loss, the gradient norm, the lr at that
step and what to try; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DivergenceError", "DivergenceGuard", "vocab_size_of", "grad_norm_of"]

# |loss − ln V| below this (relative) with a zero gradient is "uniform prediction": a collapse.
_COLLAPSE_RTOL = 1e-4
_ZERO_GRAD = 1e-10


class DivergenceError(ValueError):
    """Training produced a non-finite loss, gradient or weight, or collapsed to a uniform distribution."""


def vocab_size_of(model: nn.Module) -> int | None:
    """Rows of the output head (= the softmax width), else ``config.vocab_size``, else None."""
    hf: Any = model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if isinstance(v, int) else None


@torch.no_grad()
def grad_norm_of(params: Sequence[torch.Tensor]) -> float:
    """Global L2 norm of the gradients (what clip_grad_norm_ returns), for runs without clipping."""
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


class DivergenceGuard:
    """Per-run state: the vocabulary size (for the ln V check) and where checkpoints live."""

    def __init__(self, model: nn.Module, out_dir: Path | None = None) -> None:
        self.vocab = vocab_size_of(model)
        self.out_dir = out_dir

    def _last_checkpoint(self) -> str:
        if self.out_dir is None:
            return "no checkpoint"
        found = sorted((self.out_dir / "checkpoints").glob("step-*"))
        return (f"the last good checkpoint is kept: {found[-1]}" if found else
                "no checkpoint had been written yet")

    def check_step(self, step: int, loss: float, grad_norm: float | torch.Tensor | None, lr: float | torch.Tensor,
                   params: Sequence[torch.Tensor]) -> None:
        """``step``: the optimizer step being taken (1-based); ``loss`` its window loss; ``grad_norm``
        the clipped-from norm (None when clipping is off: computed here); ``lr`` this step's lr."""
        gn = grad_norm_of(params) if grad_norm is None else float(grad_norm)
        lr = float(lr)
        if not (math.isfinite(loss) and math.isfinite(gn)):
            what = "loss" if not math.isfinite(loss) else "gradient"
            if math.isfinite(loss):
                hint = ("the loss is finite but its gradient overflowed: lower train.lr, keep gradient "
                        "clipping on (train.max_grad_norm > 0), or use train.bf16=false")
            elif step == 1:
                hint = ("the very first step is non-finite: the model's weights or this batch's inputs are "
                        "already broken (a NaN in the base model or a poisoned record)")
            else:
                hint = ("the weights left the finite range after the previous update (lr far too high?), "
                        "or this batch holds a poisoned record: lower train.lr, check the data")
            raise DivergenceError(
                f"training diverged at step {step}: non-finite {what} (loss {loss}, gradient norm {gn}, "
                f"lr {lr:.3g} at this step); stopped before the update, {self._last_checkpoint()}. "
                f"Hint: {hint}")
        if self.vocab and gn < _ZERO_GRAD and abs(loss - math.log(self.vocab)) <= _COLLAPSE_RTOL * math.log(self.vocab):
            raise DivergenceError(
                f"training collapsed at step {step}: loss {loss:.6f} = ln V (V = {self.vocab}), the model "
                f"predicts a uniform distribution, and the gradient norm is {gn:.3g}, so nothing can change "
                f"any more (lr {lr:.3g} at this step); {self._last_checkpoint()}. Hint: the learning rate is "
                "far too high: lower train.lr by 10-100x")

    @torch.no_grad()
    def check_params(self, model: nn.Module, step: int) -> None:
        """Refuse to checkpoint or save non-finite weights (the previous checkpoint stays the last)."""
        for name, p in model.named_parameters():
            if p.requires_grad and not bool(torch.isfinite(p).all()):
                raise DivergenceError(
                    f"training diverged by step {step}: trainable parameter {name!r} holds non-finite values "
                    f"after the update; not saving it, {self._last_checkpoint()}. "
                    "Hint: lower train.lr, keep train.max_grad_norm > 0")
