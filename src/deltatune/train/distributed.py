"""Training on several processes (``torchrun``): the distributed :class:`Runtime`.

``torchrun --nproc_per_node=N -m deltatune train CONFIG`` starts N copies of the CLI; each finds
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in its environment and :func:`create_runtime` returns a
:class:`DistributedRuntime` instead of the one-process :class:`~deltatune.train.runtime.Runtime`.
Objectives and methods do not change; the loop reaches the process group only through the
Runtime's calls:

    wrap(model)           DDP (adapters on a replicated base) or FSDP2 ``fully_shard`` per block, then
                          the root (full / partial / head, or ``runtime.strategy: fsdp2``)
    shard(items)          rank r takes items r, r+N, r+2N, … of a window that every rank computes in
                          the same order (the batch order depends on the seed and epoch only)
    all_sum(n)            loss units summed over ranks: loss = N · Σ_rank-loss / Σ_all-units, and DDP's
                          gradient *mean* over ranks turns that into Σ_all-loss / Σ_all-units, the
                          one-process number
    no_sync(net, last)    no gradient all-reduce / reduce-scatter until the window's last micro-batch
    is_main               rank 0 alone writes files, logs and draws progress bars
    gathered(model)       FSDP2 shards → whole tensors for saving (adapter files, HF directories,
                          checkpoints), written back into the shards on exit when asked (resume)

Why the numbers equal one process: ``train.batch_size`` is per process, a window holds
``grad_accum × N`` micro-batches of the same global order, and the loss is normalised by the
window's global unit count, so a 2-process run with ``grad_accum=1`` sees exactly the micro-batches
of a 1-process run with ``grad_accum=2``, weighted the same (tests/train/test_distributed.py).

Checkpoints hold whole tensors under the unwrapped model's parameter names (no ``module.`` or
``_checkpoint_wrapped_module`` in them), so a run saved by N processes resumes on M.

Failure: a rank that raises exits non-zero with its own traceback (``[rank r]`` prefixed); its
peers see the connection close (gloo) or time out (``runtime.timeout_s``; NCCL's watchdog) and exit
too, and torchrun stops the rest. Ctrl-C / SIGTERM set a flag that the ranks agree on at the next
step boundary (:meth:`DistributedRuntime.any`), so all of them stop after the same step and write
one checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .runtime import Runtime

log = logging.getLogger("deltatune.train")

__all__ = ["DistributedRuntime", "RuntimeConfig", "choose_strategy", "create_runtime", "ensure_process_group",
           "is_main_process", "launched_by_torchrun", "shared_output_dir"]

T = TypeVar("T")
Strategy = Literal["auto", "ddp", "fsdp2"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class RuntimeConfig:
    """Several processes (read only under torchrun; a one-process run ignores this section)."""

    strategy: Strategy = field(
        default="auto",
        metadata=_doc("'ddp' (replicated base, gradients all-reduced), 'fsdp2' (fully_shard per block: "
                      "parameters, gradients and optimizer state split over the processes), or 'auto' = "
                      "fsdp2 when base weights train (full/partial/head) or the base does not fit on one "
                      "device, else ddp."),
    )
    timeout_s: int = field(
        default=600,
        metadata=_doc("Seconds a collective may wait for the other processes before every rank gives up "
                      "(a dead or stuck rank then ends the run instead of hanging it)."),
    )
    shard_4bit: bool = field(
        default=True,
        metadata=_doc("fsdp2: shard the packed 4-bit base weights too (less memory per rank); false keeps "
                      "them replicated (no all-gather of the base in every forward)."),
    )

    cpu_mmap_threshold_kb: int = field(
        default=1024,
        metadata=_doc("fsdp2 on CPU (gloo): heap blocks of at least this many KiB get their own mmap and go "
                      "back to the OS when freed. glibc's default raises this threshold to the largest "
                      "block freed so far (up to 32 MiB); FSDP2's per-block all-gather and reduce-scatter "
                      "buffers then come from the heap, interleaved with the activations saved for "
                      "backward, and the fragmented heap keeps ~1 GiB more resident per rank on the "
                      "default model than is live. Lower: less memory, more time in page faults; 0 keeps "
                      "glibc's own policy (as does a MALLOC_MMAP_THRESHOLD_ set in the environment)."),
    )

    def __post_init__(self) -> None:
        if self.cpu_mmap_threshold_kb < 0:
            raise ValueError(f"runtime.cpu_mmap_threshold_kb must be >= 0 (0 = glibc's default), "
                             f"got {self.cpu_mmap_threshold_kb}")
        if self.strategy not in ("auto", "ddp", "fsdp2"):
            raise ValueError(f"runtime.strategy must be 'auto', 'ddp' or 'fsdp2', got {self.strategy!r}")
        if self.timeout_s < 1:
            raise ValueError(f"runtime.timeout_s must be >= 1 second, got {self.timeout_s}")


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or any launcher that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def create_runtime(cfg: Any, device: str | torch.device = "auto") -> Runtime:
    """The one-process Runtime, or a :class:`DistributedRuntime` when launched by torchrun.
    ``cfg``: the TrainConfig (train.bf16, the method, runtime.*); ``device``: model.device, or the
    device of a model passed in."""
    if not launched_by_torchrun():
        return Runtime.create(cfg.train.bf16, device)
    return DistributedRuntime.create_distributed(cfg, device)


def ensure_process_group(device: str | torch.device = "auto", timeout_s: int = 600) -> torch.device:
    """Join the process group torchrun describes (once per process) and return this rank's device:
    NCCL on CUDA (one GPU per local rank), gloo on CPU, chosen from ``device`` (model.device;
    'auto' = CUDA when this machine has it)."""
    from ..models import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                timeout=_dt.timedelta(seconds=timeout_s), **kw)
    return dev


def shared_output_dir(cfg: Any, device: str | torch.device) -> Path:
    """The run directory, the same on every rank: rank 0's ``{timestamp}`` wins."""
    out_dir = Path(cfg.output_dir) if cfg.resume else cfg.resolve_output_dir()
    if not launched_by_torchrun():
        return out_dir
    rcfg = getattr(cfg, "runtime", None) or RuntimeConfig()
    ensure_process_group(device, rcfg.timeout_s)
    box = [str(out_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def is_main_process() -> bool:
    """Rank 0, or a run without torchrun (usable before the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def choose_strategy(rcfg: RuntimeConfig, *, trains_base: bool, model: nn.Module, device: torch.device) -> str:
    """``runtime.strategy`` resolved for this run.

    auto: FSDP2 when the method trains base weights (full, partial, head: their gradients and Adam
    moments are 3× their size, and those are what sharding splits), or when the replicated model
    would not fit the device; DDP otherwise (an adapter's gradients are small, and DDP overlaps
    their all-reduce with the backward)."""
    if rcfg.strategy != "auto":
        return rcfg.strategy
    if trains_base:
        return "fsdp2"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        if size > 0.8 * free:
            log.info("the replicated model (%.0f MiB) would not fit the free %.0f MiB: using fsdp2",
                     size / 2**20, free / 2**20)
            return "fsdp2"
    return "ddp"


class DistributedRuntime(Runtime):
    """One rank of a torchrun job (see the module docstring)."""

    def __init__(self, device: torch.device, bf16: bool, rcfg: RuntimeConfig, rank: int, world: int,
                 local_rank: int, *, trains_base: bool = False, optimizer: str = "adamw") -> None:
        super().__init__(device, bf16)
        self.rcfg = rcfg
        self.trains_base = trains_base  # the method updates base weights (it saves a whole model)
        self.optimizer_name = optimizer
        self.rank = rank
        self.world = world
        self.local_rank = local_rank
        self.strategy: str = rcfg.strategy  # resolved in wrap()
        self._names: dict[int, str] = {}
        self._sync = True  # gradients are reduced in this backward (the window's last micro-batch)

    @classmethod
    def create_distributed(cls, cfg: Any, device: str | torch.device) -> DistributedRuntime:
        """Join the process group torchrun describes: NCCL on CUDA (one GPU per local rank), gloo
        on CPU, chosen from ``model.device`` ('auto' = CUDA when this machine has it)."""
        from ..registry import get_method

        rcfg: RuntimeConfig = getattr(cfg, "runtime", None) or RuntimeConfig()
        dev = ensure_process_group(device, rcfg.timeout_s)
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = dist.get_backend()
        _tag_log_records(rank)
        base = Runtime.create(cfg.train.bf16, dev)
        rt = cls(base.device, base.bf16, rcfg, rank, world, local_rank,
                 trains_base=get_method(cfg.method).saves == "model", optimizer=cfg.train.optimizer)
        if rank == 0:
            log.info("torchrun: %d processes, backend %s, device %s", world, backend, dev.type)
        return rt

    # -- the seam's calls ----------------------------------------------------------------------
    def wrap(self, model: nn.Module, hooks: Sequence[Any] = ()) -> nn.Module:
        """DDP or FSDP2 around ``model`` (after the method, before the optimizer). Under FSDP2 the
        model itself becomes the sharded module (``fully_shard`` works in place): the return value
        is ``model``; under DDP it is the ``DistributedDataParallel`` wrapper, and ``model`` stays
        the plain module that objectives save and evaluate."""
        self.strategy = choose_strategy(self.rcfg, trains_base=self.trains_base, model=model, device=self.device)
        self._names = {id(p): n for n, p in model.named_parameters()}  # for rebind()
        if self.rank == 0:
            log.info("distributed strategy: %s", self.strategy)
        if self.strategy == "fsdp2":
            self.can_merge = False  # adapters merge into the base for evaluation only when it is whole
            return self._fully_shard(model, replicate_trainable=bool(hooks) and not self.trains_base)
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Every rank built the same model from the same seed; DDP still broadcasts rank 0's
        # parameters and buffers once, so a rank that drew differently cannot drift.
        return DDP(model, device_ids=ids, broadcast_buffers=False)

    def _fully_shard(self, model: nn.Module, replicate_trainable: bool) -> nn.Module:
        """``fully_shard`` per block, then the root. ``replicate_trainable``: the adapter stays whole
        on every rank (a hook reads it between forwards: AdaLoRA's orthogonality penalty and rank
        allocator need whole matrices) and its gradients are all-reduced here, as DDP would."""
        from torch.distributed.fsdp import fully_shard

        from ..structure import block_list

        if self.optimizer_name == "adamw8bit":
            raise ValueError("runtime.strategy fsdp2 cannot shard train.optimizer adamw8bit state: use adamw")
        ignored: set[nn.Parameter] = set()
        if not self.rcfg.shard_4bit:
            ignored = {p for p in model.parameters() if not p.is_floating_point()}
        if replicate_trainable:
            trainable = [p for p in model.parameters() if p.requires_grad]
            ignored |= set(trainable)
            for p in trainable:
                dist.broadcast(p.data, src=0)  # as DDP does: every rank starts from rank 0's adapter
                p.register_post_accumulate_grad_hook(self._mean_grad)
            log.info("fsdp2: the base is sharded; the adapter stays whole on every rank (the method's hooks read it)")
        kw: dict[str, Any] = {"ignored_params": ignored} if ignored else {}
        if self.device.type == "cpu":
            # before the shards are allocated, so that they and every later buffer follow the fixed policy
            _fix_mmap_threshold(self.rcfg.cpu_mmap_threshold_kb * 1024)
        _, blocks = block_list(model)
        for block in blocks:  # one all-gather per block in forward; only one block unsharded at a time
            fully_shard(block, **kw)
        fully_shard(model, **kw)  # the rest: embeddings, final norm, output head, prompt tables
        if self.device.type == "cpu":
            _release_freed_memory()
        return model

    def _mean_grad(self, p: torch.Tensor) -> None:
        # an adapter kept whole under FSDP2: its gradient averaged over ranks at the window's end
        if self._sync and p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(self.world)

    def shard(self, items: Sequence[T]) -> list[T]:
        if len(items) < self.world:
            raise ValueError(
                f"a gradient-accumulation window has {len(items)} micro-batches for {self.world} processes: "
                f"every process needs at least one (fewer train rows than train.batch_size × processes?); "
                "lower train.batch_size or use fewer processes")
        return list(items[self.rank :: self.world])

    def all_sum(self, n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64, device=self._comm_device)
        dist.all_reduce(t)
        return int(t.item())

    def all_mean(self, x: float) -> float:
        """The mean of a float over ranks (the logged loss: each rank's share of the window's loss)."""
        t = torch.tensor([x], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on some rank (stop requests, error flags)."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: T) -> T:
        """Rank 0's value of ``obj`` on every rank (the run directory's timestamp)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def barrier(self) -> None:
        dist.barrier()

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager[Any]:
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel as DDP

        if isinstance(model, DDP):
            return contextlib.nullcontext() if last else model.no_sync()
        if isinstance(model, FSDPModule):
            self._sync = last
            return _fsdp_sync(model, last)
        return contextlib.nullcontext()


    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @contextlib.contextmanager
    def gathered(self, model: nn.Module, *, write_back: bool = False, main_only: bool = False) -> Iterator[None]:
        """FSDP2 shards → whole parameters inside the block, so code written for one process
        (save_adapter, save_pretrained, checkpoints) sees an ordinary model. ``main_only``: only
        rank 0 keeps the whole tensors (it alone writes; the others only take part in the
        gathers). ``write_back``: what the block changed (a checkpoint loaded into the whole
        tensors) goes back into each rank's shard. A collective: every rank must enter it.
        Without FSDP2 nothing changes."""
        with gathered(model, write_back=write_back, keep=not main_only or self.is_main):
            yield

    def optimizer_view(self, optimizer: torch.optim.Optimizer) -> Any:
        """``optimizer`` as checkpoints see it: under FSDP2 its state as whole tensors, gathered
        now (a collective: every rank calls this, rank 0 keeps the result), and a
        ``load_state_dict`` that takes whole tensors and keeps this rank's shard."""
        return _WholeStateOptimizer(optimizer, keep=self.is_main) if self.strategy == "fsdp2" else optimizer

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (per-rank peak memory for the summary)."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def rebind(self, model: nn.Module, params: list[nn.Parameter],
               upcast: list[tuple[nn.Parameter, torch.dtype]]
               ) -> tuple[list[nn.Parameter], list[tuple[nn.Parameter, torch.dtype]]]:
        named = dict(model.named_parameters())
        return ([named[self._names[id(p)]] for p in params],
                [(named[self._names[id(p)]], dt) for p, dt in upcast])

    def scalar(self, t: torch.Tensor | float) -> float:
        """A float from a tensor that may be a DTensor (the gradient norm under FSDP2)."""
        if _is_dtensor(t):
            t = t.full_tensor()  # type: ignore[union-attr]
        return float(t)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _fsdp_sync(model: Any, last: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(last)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# mallopt(3) parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _fix_mmap_threshold(nbytes: int) -> bool:
    """Make glibc serve blocks of ``nbytes`` or more with their own mmap, returned to the OS on free,
    and stop it from raising that threshold (see ``RuntimeConfig.cpu_mmap_threshold_kb``). Measured on
    the default model, full fine-tuning, 2 ranks: at glibc's dynamic threshold each rank's heap held
    1.3-2.3 GiB free beside 0.95 GiB live at a step boundary, and its peak RSS equalled one unsharded
    process's. True when the policy was set (glibc only; elsewhere nothing changes)."""
    if nbytes <= 0 or "MALLOC_MMAP_THRESHOLD_" in os.environ:  # 0, or the user chose in the environment
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt): its allocator, its policy
        return False
    # Trim the heap's top above twice the threshold: the ratio glibc's own dynamic policy keeps. The
    # trim threshold may already have been raised while the model loaded, so it is set explicitly.
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * nbytes))


def _release_freed_memory() -> None:
    """Give the whole parameters that sharding freed back to the OS (glibc keeps freed heap pages
    otherwise, and each rank's RSS would stay at the whole model's)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def gathered(model: nn.Module, *, write_back: bool = False, keep: bool = True) -> Iterator[None]:
    """See :meth:`DistributedRuntime.gathered` (``keep`` = not main_only, or rank 0). Parameters
    shared by two modules (tied embeddings) are gathered once and stay shared."""
    from torch.distributed.tensor import distribute_tensor

    swaps: list[tuple[nn.Module, str, nn.Parameter]] = []
    whole: dict[int, nn.Parameter] = {}
    originals: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is None or not _is_dtensor(p):
                continue
            if id(p) not in originals:
                # the whole (rows, …) tensor; a collective, so every rank gathers every parameter in order
                full = p.detach().full_tensor()  # type: ignore[attr-defined]
                originals[id(p)] = p
                if keep:
                    whole[id(p)] = nn.Parameter(full, requires_grad=p.requires_grad)
            if keep:
                swaps.append((module, pname, p))
                module._parameters[pname] = whole[id(p)]
    try:
        yield
    finally:
        for module, pname, p in swaps:
            module._parameters[pname] = p
        if write_back and keep:
            with torch.no_grad():
                for key, p in originals.items():
                    # src_data_rank=None: every rank holds the whole tensor; take the local shard
                    local = distribute_tensor(whole[key].detach(), p.device_mesh,  # type: ignore[attr-defined]
                                              p.placements, src_data_rank=None).to_local()  # type: ignore[attr-defined]
                    p.to_local().copy_(local)  # type: ignore[attr-defined]


class _WholeStateOptimizer:
    """An optimizer's ``state_dict`` / ``load_state_dict`` with whole tensors in place of FSDP2
    shards: what checkpoints store, so the process count may change between save and resume."""

    def __init__(self, optimizer: torch.optim.Optimizer, keep: bool) -> None:
        self._opt = optimizer
        sd = optimizer.state_dict()
        # every rank gathers every tensor in the same order; only `keep` holds on to them
        state = {}
        for idx, s in sd["state"].items():
            state[idx] = {k: v.full_tensor() if _is_dtensor(v) else v for k, v in s.items()}
            if not keep:
                state[idx] = {}
        self._state = {"state": state, "param_groups": sd["param_groups"]}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._opt, name)

    def state_dict(self) -> dict[str, Any]:
        return self._state

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        from torch.distributed.tensor import distribute_tensor

        params = [p for g in self._opt.param_groups for p in g["params"]]
        state: dict[Any, dict[str, Any]] = {}
        for idx, s in sd["state"].items():
            p = params[int(idx)]
            state[idx] = {}
            for k, v in s.items():
                if _is_dtensor(p) and isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                    v = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)
                state[idx][k] = v
        self._opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


_TAGGED = False


def _tag_log_records(rank: int) -> None:
    """Rank > 0 logs warnings and errors only, each line tagged with its rank (once per process)."""
    global _TAGGED
    if _TAGGED:
        return
    _TAGGED = True
    logger = logging.getLogger("deltatune")
    if rank > 0:
        logger.setLevel(logging.WARNING)
    old = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = old(*args, **kwargs)
        if rank > 0 and isinstance(record.msg, str) and not record.msg.startswith("[rank"):
            record.msg = f"[rank {rank}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)
