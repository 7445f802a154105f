"""What a run optimises and how it is judged: the :class:`Objective` seam of the training loop.

The loop (``deltatune.train.loop.run``) knows no model family, batch shape, loss or metric; it asks
the objective named by ``cfg.objective`` (``registry.OBJECTIVES``):

    setup(cfg, rt, model=, processor=)  → (model, processor, Splits)   the model to adapt + prepared data
    collate(rows)                       → Batch                        rows of Splits.train/eval → one batch
    weight(batch)                       → int                          loss units in the batch
    loss_sum(model, batch)              → fp32 scalar                  Σ of the per-unit losses
    evaluate(model, splits, rt, ...)    → dict                         the objective's own metrics
    save(model, out_dir)                                               the trained result, in its layout

Loss normalisation is the loop's: it sums ``loss_sum`` over a gradient-accumulation window (and, once
torchrun lands, over ranks) and divides by the summed ``weight``, so every unit (label token,
example, image) weighs the same whichever micro-batch it landed in.

Rules: ``loss_sum`` goes through ``model(...)`` (the model's own forward, so wrappers such as DDP
and the method's hooks apply); an objective never touches the optimizer or calls ``backward()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from ..testing import TinyCase
    from ..train.runtime import Runtime

__all__ = ["Batch", "Splits", "Objective", "Stage"]

# A collated batch: tensors with a leading batch dimension (input_ids (B, T), labels, pixel values …)
# plus pass-through columns as plain lists of length B (an "adapter" name per row, an "is_prior" flag
# per row). Runtime.to_device moves the tensors and leaves the rest alone.
Batch = dict[str, Any]

# When evaluate() runs: "before" / "after" training (full metrics, files written to out_dir) or
# "during" (every train.eval_every steps: cheap metrics only, merged into that step's metrics record).
Stage = Literal["before", "during", "after"]


@dataclass
class Splits:
    """Prepared data. ``train``/``eval`` are indexable rows that :meth:`Objective.collate` batches
    (the loop draws index batches from ``epoch_batches(len(train), …)``, so order is resumable)."""

    train: Sequence[Any]
    eval: Sequence[Any] = ()
    info: dict[str, Any] = field(default_factory=dict)  # summary.json's "data" entry (counts, format …)
    extra: Any = None  # anything else the objective's evaluate needs (prompts and references …)


class Objective(ABC):
    """Base class of objectives: subclass it, register the class in ``registry.OBJECTIVES``.

    ``Config`` (optional) is the dataclass of the objective's own config section: ``TrainConfig`` then
    has a section named ``name`` of that type (YAML ``<name>: {...}``, ``--set <name>.key=value``),
    read back with :func:`deltatune.train.config.section`.
    """

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --help and the README
    Config: ClassVar[type | None] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg  # the whole TrainConfig (objectives read data/eval/their own section)

    @abstractmethod
    def setup(self, cfg: Any, rt: Runtime, *, model: nn.Module | None = None,
              processor: Any = None) -> tuple[nn.Module, Any, Splits]:
        """Build (or take, when passed in) the model to adapt and its tokenizer/processor on
        ``rt.device``; prepare the data. Nothing trainable is decided here (the method does that)."""

    @abstractmethod
    def collate(self, rows: Sequence[Any]) -> Batch: ...

    @abstractmethod
    def weight(self, batch: Batch) -> int:
        """Loss units in ``batch``: the denominator share of this batch (label tokens, examples …)."""

    @abstractmethod
    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Σ over the batch's loss units, an fp32 scalar, computed through ``model(...)``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, splits: Splits, rt: Runtime, *, stage: Stage,
                 out_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
        """Metrics of ``model`` on ``splits.eval`` (model mode restored afterwards). Keys are the
        objective's own (``eval_loss``, ``exact_match``, ``accuracy`` …); "during" returns cheap ones."""

    def after_apply(self, model: nn.Module) -> None:
        """Called once after the method's apply, before the trainable parameters are collected: what
        the objective itself adds to the trained set whatever the method (classify: its new head)."""
        return None

    @abstractmethod
    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write the trained result under ``out_dir`` (an adapter dir, an HF model dir …)."""

    @classmethod
    def tiny_case(cls) -> TinyCase:
        """A tiny model + data for tests/test_matrix.py (every (objective × method) pair trains 2 steps
        through run()); see :class:`deltatune.testing.TinyCase`."""
        raise NotImplementedError(f"objective {cls.name!r} provides no tiny_case() for tests/test_matrix.py")

    def size(self, batch: Batch) -> int:
        """Input units for throughput figures (summary ``tokens_per_s``): the attention mask's real
        tokens when there is one, else the number of rows."""
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
        return int(first.shape[0])
