"""Where a run executes: device, precision, and (later) the process group.

Today a run is one process (``world == 1``, ``rank == 0``) and every distributed call is the
identity. The loop already goes through these calls at the points a torchrun run differs, so a
distributed Runtime slots in without touching objectives or methods:

    wrap(model)           after the method is applied, before the optimizer (DDP/FSDP go here)
    shard(items)          this rank's share of a window's micro-batches
    all_sum(n)            loss units summed over ranks, so every token/image weighs the same
    no_sync(model, last)  skip the gradient all-reduce on all but the last micro-batch
    is_main               only the main rank writes files, logs and shows progress

Precision: the frozen base keeps its load dtype; what trains is held in fp32 master copies
(:meth:`Runtime.fp32_masters`), and matmuls run in bf16 under :meth:`Runtime.autocast` when on.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger("deltatune.train")

__all__ = ["Runtime", "StopFlag"]

T = TypeVar("T")


class Runtime:
    """One process on one device (see the module docstring for what a distributed one changes)."""

    world: int = 1
    rank: int = 0

    def __init__(self, device: torch.device, bf16: bool) -> None:
        self.device = device
        self.bf16 = bf16  # bf16 autocast on; fp32_masters may turn it on

    @classmethod
    def create(cls, bf16: bool | str, device: str | torch.device = "auto") -> Runtime:
        """``bf16``: train.bf16 (True/False/'auto' = where the device computes bf16 natively);
        ``device``: model.device, or the device of a model passed in."""
        from ..models import resolve_device, resolve_dtype

        dev = resolve_device(device)
        on = resolve_dtype("auto", dev) == torch.bfloat16 if bf16 == "auto" else bool(bf16)
        return cls(dev, on)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def shard(self, items: Sequence[T]) -> list[T]:
        return list(items[self.rank :: self.world])

    def all_sum(self, n: int) -> int:
        return n

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Tensors to the run's device; pass-through columns (adapter names, flags) unchanged."""
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def fp32_masters(self, params: Sequence[nn.Parameter]) -> list[tuple[nn.Parameter, torch.dtype]]:
        """Trainable 16-bit parameters become fp32 master copies (in place); returns what to cast
        back with :meth:`restore_dtypes` before saving and generating."""
        upcast: list[tuple[nn.Parameter, torch.dtype]] = []
        with torch.no_grad():
            for p in params:
                if p.dtype in (torch.bfloat16, torch.float16):
                    upcast.append((p, p.dtype))
                    p.data = p.data.float()
        if upcast and not self.bf16:
            # fp32 masters inside a 16-bit model: adapter layers cast for themselves, but a plain
            # trained layer (head, partial, full, modules_to_save) would meet mixed dtypes.
            log.warning("the model is %s and train.bf16 is off: using bf16 autocast anyway, since the trained "
                        "parameters are fp32 master copies", str(upcast[0][1]).removeprefix("torch."))
            self.bf16 = True
        return upcast

    @staticmethod
    def restore_dtypes(upcast: Sequence[tuple[nn.Parameter, torch.dtype]]) -> None:
        """Trained parameters back to the model's own dtype: one dtype to save and to generate with
        (generation runs without autocast)."""
        with torch.no_grad():
            for p, dtype in upcast:
                p.data = p.data.to(dtype)

    def peak_memory_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to stop after the current step, checkpoint, and exit."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.raised = True
        log.warning("signal %d: finishing the current step, writing a checkpoint, then exiting", signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
