"""How methods and regularisers act on the training loop: :class:`Hook` objects, nothing else.

A method's ``apply(model, cfg, info)`` (see :mod:`deltatune.registry`) returns a list of hooks; the
loop adds :func:`regularisers` (EWC, L2-SP, KL to the base: a later issue) and then only ever calls

    extra_loss(model)   once per optimizer step: a scalar added to the loss (AdaLoRA's orthogonality
                        penalty, EWC's quadratic pull). The loop spreads it over the window's
                        micro-batches (each adds ``extra / len(window)``), so its gradient enters once.
    after_step(step)    after ``optimizer.step()`` and before ``zero_grad`` (AdaLoRA's rank allocator
                        reads that step's gradients); ``step`` is 0-based.
    state_dict() / load_state_dict(state)
                        what the hook carries between steps, saved in every checkpoint under the
                        hook's ``name``: JSON values, plus tensors under the key ``"tensors"``
                        (a flat ``{str: Tensor}``), which go to the checkpoint's safetensors file.

Several hooks coexist (AdaLoRA's two + an EWC penalty); names must be unique and match
``[A-Za-z0-9_-]+`` (they become checkpoint keys). No attribute is ever patched onto the model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from ..objectives.base import Objective, Splits

__all__ = ["Hook", "RunInfo", "regularisers", "extra_loss", "after_step", "check_hooks"]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@runtime_checkable
class Hook(Protocol):
    """The loop's only door for methods and regularisers (see the module docstring)."""

    name: str

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None: ...

    def after_step(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class RunInfo:
    """What a method may need to know about the run it is applied for; the user's config is never
    rewritten to carry it (AdaLoRA's rank schedule reads ``total_steps`` from here)."""

    total_steps: int  # optimizer steps of the whole run (train.max_steps, or derived from epochs)
    steps_per_epoch: int
    world: int = 1  # processes sharing one global batch (torchrun)
    processor: Any = None  # the tokenizer / processor the objective built (prompt init from text)


def regularisers(cfg: Any, objective: Objective, model: nn.Module, splits: Splits, *,
                 resuming: bool = False) -> list[Hook]:
    """Hooks that regularise the run whatever the method: EWC, L2-SP and KL-to-base, each reading its
    own config section (and, for the Fisher estimate, ``splits``; not when ``resuming``, since the
    checkpoint holds it): see :func:`deltatune.regularize.build`."""
    from ..regularize import build

    return build(cfg, objective, model, splits, resuming=resuming)


def check_hooks(hooks: Sequence[Hook]) -> list[Hook]:
    """The hooks as a list, after checking each names itself uniquely (checkpoint keys)."""
    seen: set[str] = set()
    for h in hooks:
        if not isinstance(h, Hook):
            raise TypeError(f"{type(h).__name__} is not a Hook (name, extra_loss, after_step, state_dict, "
                            "load_state_dict)")
        if not _NAME.match(h.name) or h.name in seen:
            raise ValueError(f"hook name {h.name!r} must be unique and match [A-Za-z0-9_-]+")
        seen.add(h.name)
    return list(hooks)


def extra_loss(hooks: Sequence[Hook], model: nn.Module) -> torch.Tensor | None:
    """Σ of the hooks' extra losses (None when no hook adds one)."""
    total: torch.Tensor | None = None
    for h in hooks:
        value = h.extra_loss(model)
        if value is not None:
            total = value if total is None else total + value
    return total


def after_step(hooks: Sequence[Hook], step: int) -> None:
    for h in hooks:
        h.after_step(step)
