"""The one training loop, for every objective, method and strategy (nanoGPT-sized on purpose).

    run(cfg) → objective.setup (model + data) → evaluate before → method.apply (→ hooks) → train
             → objective.save → evaluate after (adapters merged) → summary.json

What varies lives behind three seams: the objective (``deltatune.objectives``: model, batches,
loss units, loss, metrics, save layout), hooks (``train/hooks.py``: what methods and regularisers
add to the loss or do between steps) and the runtime (``train/runtime.py``: device, autocast,
fp32 masters, and later the process group).

Loss: ``objective.loss_sum`` summed over a whole gradient-accumulation window and divided by the
window's loss units (``objective.weight``), so every unit weighs the same whichever micro-batch it
landed in. Resume: batches come from ``epoch_batches(n, batch, seed, epoch)``, so a resumed run
recomputes the same order, skips what it consumed and restores optimizer/scheduler/hooks/RNG —
the losses after resuming equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import to_dict
from ..fsutil import dumps_json
from ..io import atomic_write_bytes
from ..registry import apply_method, get_objective
from ..regularize import report as hooks_report
from . import forgetting, replay
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .distributed import create_runtime, is_main_process, shared_output_dir
from .guard import DivergenceGuard
from .hooks import RunInfo, after_step, check_hooks, extra_loss, regularisers
from .inference import merged_for_inference
from .optim import lr_lambda, make_optimizer, make_scheduler
from .rundir import claim, last_logged_loss, truncate_metrics
from .runtime import StopFlag

log = logging.getLogger("deltatune.train")

__all__ = ["run", "RunResult", "lr_lambda"]


@dataclass
class RunResult:
    output_dir: Path
    summary: dict[str, Any]
    losses: list[float] = field(default_factory=list)
    interrupted: bool = False


@dataclass
class _Progress:  # what a checkpoint records of where the run is
    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_done: int = 0  # micro-batches of this epoch consumed
    tokens: int = 0  # input units seen (objective.size)


def run(cfg: TrainConfig, *, model: nn.Module | None = None, tokenizer: Any = None, progress: bool = True,
        stop_after_steps: int | None = None) -> RunResult:
    """Train as ``cfg`` says. ``model``/``tokenizer`` (or processor) may be passed in (tests, notebooks)
    instead of being built from ``cfg.model``. ``stop_after_steps`` simulates an interruption.

    A run that fails leaves no half-made run directory behind: one this call created and that holds
    no checkpoint yet is removed; otherwise ``error.txt`` in it says why the run stopped."""
    out_dir = shared_output_dir(cfg, _device_setting(cfg, model, tokenizer))  # rank 0's, under torchrun
    if is_main_process():
        claim(cfg, out_dir)  # one run per directory; --resume only with the same config (rundir.py)
    existed = out_dir.exists()
    try:
        return _run(cfg, out_dir, model, tokenizer, progress, stop_after_steps)
    except BaseException as e:
        if is_main_process():
            _record_failure(out_dir, existed, e)
        raise


def _device_setting(cfg: TrainConfig, model: nn.Module | None, tokenizer: Any) -> str | torch.device:
    return next(model.parameters()).device if model is not None and tokenizer is not None else cfg.model.device


def _record_failure(out_dir: Path, existed: bool, error: BaseException) -> None:
    if not out_dir.is_dir():
        return
    if not existed and latest_checkpoint(out_dir) is None:
        shutil.rmtree(out_dir, ignore_errors=True)
        return
    message = f"{type(error).__name__}: {error}\n" if str(error) else f"{type(error).__name__}\n"
    with contextlib.suppress(OSError):
        atomic_write_bytes(out_dir / "error.txt", message.encode())


def _run(cfg: TrainConfig, out_dir: Path, model: nn.Module | None, tokenizer: Any, progress: bool,
         stop_after_steps: int | None) -> RunResult:
    t_start = time.perf_counter()
    obj = get_objective(cfg.objective)(cfg)
    torch.manual_seed(cfg.train.seed)
    passed_in = model is not None and tokenizer is not None
    rt = create_runtime(cfg, _device_setting(cfg, model, tokenizer))  # several processes under torchrun
    model, processor, splits = obj.setup(cfg, rt, model=model if passed_in else None,
                                         processor=tokenizer if passed_in else None)
    splits = replay.mix(cfg, obj, splits)  # data.replay_file: replay rows appended to train
    _make_run_dir(cfg, out_dir, rt.is_main)  # only now that the model and the data are ready
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    # Every rank holds a probe (its final forwards are collective under FSDP2); rank 0 writes.
    probe = forgetting.probe_for_run(cfg, obj, model, out_dir, rt.autocast, writes=rt.is_main)
    if not isinstance(probe, str):
        probe.before(model)  # full/partial/head: the base's reference log-probs, cached (reused on resume)
    before: dict[str, Any] = {}
    main_dir = out_dir if rt.is_main else None  # only rank 0 writes files
    if ckpt is not None and (out_dir / "before.json").exists():
        before = json.loads((out_dir / "before.json").read_text())
    elif cfg.eval.before and ckpt is None:
        before = obj.evaluate(model, splits, rt, stage="before", out_dir=main_dir, progress=progress)
        if rt.is_main:
            atomic_write_bytes(out_dir / "before.json", dumps_json(before, indent=2).encode())

    # A window: grad_accum micro-batches per process (train.batch_size is per process).
    ga = cfg.train.grad_accum * rt.world
    per_epoch = max(1, len(replay.batch_plan(cfg, splits, 0)) // ga)
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else per_epoch * cfg.train.epochs
    info = RunInfo(total_steps=total_steps, steps_per_epoch=per_epoch, world=rt.world, processor=processor)
    hooks = apply_method(model, cfg, info)
    obj.after_apply(model)  # e.g. a classifier's new head, one adapter per task; before the regularisers see it
    hooks = check_hooks(hooks + regularisers(cfg, obj, model, splits, resuming=ckpt is not None))
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"method {cfg.method!r} left no trainable parameter")
    upcast = rt.fp32_masters(params)
    _gradient_checkpointing(model, cfg.train.gradient_checkpointing)
    from ..inject import parameter_report

    report = parameter_report(model)
    log.info("%s", report["line"])
    net = rt.wrap(model, hooks)  # after apply, before the optimizer; `model` stays the unwrapped one
    params, upcast = rt.rebind(model, params, upcast)  # FSDP2 put sharded parameters in their place
    optimizer = make_optimizer(cfg, model)
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    prog = _Progress()
    if ckpt is not None:
        with rt.gathered(model, write_back=True):  # whole tensors in the file, this rank's shard kept
            prog = _Progress(**load_checkpoint(ckpt, model, rt.optimizer_view(optimizer), scheduler, hooks))
        log.info("resumed from %s (step %d)", ckpt, prog.step)
    elif cfg.resume:
        log.warning("resume: no checkpoint in %s; starting from scratch", out_dir)

    metrics_path = out_dir / "metrics.jsonl" if rt.is_main else Path(os.devnull)
    if rt.is_main:
        truncate_metrics(metrics_path, prog.step)  # steps after the checkpoint are redone: log them once
    guard = DivergenceGuard(model, out_dir)
    losses: list[float] = []
    model.train()
    t_train, units_this_run, interrupted = time.perf_counter(), 0, False
    bar = tqdm(total=total_steps, initial=prog.step, desc=f"train {cfg.method}", unit="step",
               disable=not (progress and rt.is_main), dynamic_ncols=True)

    def checkpoint() -> None:
        with rt.gathered(model, main_only=True):
            opt = rt.optimizer_view(optimizer)  # whole tensors: resumable on another process count
            if rt.is_main:
                guard.check_params(model, prog.step)  # checkpoints are finite: the last one is the last good state
                save_checkpoint(out_dir, prog.step, model, opt, scheduler, asdict(prog), hooks)
        rt.barrier()

    with StopFlag() as stop, open(metrics_path, "a") as metrics:
        while prog.step < total_steps and not interrupted:
            batches = replay.batch_plan(cfg, splits, prog.epoch)  # epoch_batches, or replay-mixed
            # Whole accumulation windows only; a ragged tail of micro-batches rolls into the next epoch's order.
            usable = (len(batches) // ga) * ga or len(batches)
            while prog.micro_done < usable and prog.step < total_steps:
                idx = batches[prog.micro_done : min(prog.micro_done + ga, usable)]
                window = [obj.collate([splits.train[i] for i in b]) for b in rt.shard(idx)]
                n = rt.all_sum(sum(obj.weight(b) for b in window))  # every unit weighs the same, on any rank
                total = 0.0
                for k, b in enumerate(window):
                    with rt.no_sync(net, last=k == len(window) - 1):
                        with rt.autocast():
                            loss = rt.world * obj.loss_sum(net, rt.to_device(b)) / max(1, n)
                            extra = extra_loss(hooks, net)
                        (loss + extra / len(window) if extra is not None else loss).backward()
                    total += float(loss.detach())
                total = rt.all_mean(total)  # Σ over ranks of Σ_b loss_sum / n: the window's mean loss
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
                             if cfg.train.max_grad_norm > 0 else None)
                guard.check_step(prog.step + 1, total, None if grad_norm is None else rt.scalar(grad_norm), scheduler.get_last_lr()[0], params)  # before the update
                optimizer.step()
                scheduler.step()
                after_step(hooks, prog.step)  # before zero_grad: AdaLoRA scores use this step's gradients
                optimizer.zero_grad(set_to_none=True)
                prog.micro_done += len(idx)
                prog.step += 1
                units = rt.all_sum(sum(obj.size(b) for b in window))
                prog.tokens += units
                units_this_run += units
                losses.append(total)
                elapsed = time.perf_counter() - t_train
                rec: dict[str, Any] = {"step": prog.step, "epoch": prog.epoch, "loss": round(total, 6),
                                       "lr": scheduler.get_last_lr()[0], "tokens": prog.tokens,
                                       "tokens_per_s": round(units_this_run / elapsed, 1),
                                       "elapsed_s": round(elapsed, 2)}
                if grad_norm is not None:
                    rec["grad_norm"] = round(rt.scalar(grad_norm), 5)
                if cfg.train.eval_every and prog.step % cfg.train.eval_every == 0 and splits.eval:
                    ev = obj.evaluate(model, splits, rt, stage="during")
                    rec.update({k: round(v, 6) if isinstance(v, float) else v for k, v in ev.items()})
                _log_step(metrics, rec, bar, cfg.train.log_every if bar.disable and rt.is_main else 0, total_steps)
                if cfg.train.save_every and prog.step % cfg.train.save_every == 0:
                    checkpoint()
                # every rank stops after the same step (a signal may reach one rank first)
                if rt.any(stop.raised or (stop_after_steps is not None and prog.step >= stop_after_steps)):
                    interrupted = True
                    break
            if not interrupted:
                prog.epoch, prog.micro_done = prog.epoch + 1, 0
        bar.close()
        checkpoint()
    train_seconds = time.perf_counter() - t_train
    if interrupted:
        log.warning("stopped at step %d/%d; continue with --resume --set output_dir=%s", prog.step, total_steps,
                    out_dir)
        return RunResult(out_dir, {"interrupted_at_step": prog.step, "output_dir": str(out_dir)}, losses, True)

    rt.restore_dtypes(upcast)
    with rt.gathered(model, main_only=True):  # FSDP2: the whole adapter / model, on rank 0
        if rt.is_main:
            obj.save(model, out_dir)
    rt.barrier()
    # A model passed in is the caller's afterwards; one built here is dropped when run() returns.
    with merged_for_inference(model, restore_exact=passed_in) if rt.can_merge else contextlib.nullcontext():
        after = obj.evaluate(model, splits, rt, stage="after", out_dir=main_dir, progress=progress)
    fgt = forgetting.finish_run(probe, model, {"before": before, "after": after}, out_dir)
    peaks = rt.all_gather(round(rt.peak_memory_mb(), 1))
    if not rt.is_main:
        return RunResult(out_dir, {}, losses, interrupted)
    from .plots import plot_losses

    plot_losses(metrics_path, out_dir / "loss.png")
    summary = {
        "objective": cfg.objective, "method": cfg.method, "model": cfg.model.spec, "device": str(rt.device),
        "bf16": rt.bf16, "before": before, "after": after, "trainable_params": report["trainable"],
        "all_params": report["total"], "trainable_percent": round(float(report["percent"]), 4),  # type: ignore[arg-type]
        "steps": prog.step, "train_tokens": prog.tokens, "train_seconds": round(train_seconds, 2),
        "tokens_per_s": round(units_this_run / max(train_seconds, 1e-9), 1),
        "wall_seconds": round(time.perf_counter() - t_start, 2), "peak_memory_mb": peaks[0],
        "data": splits.info, "final_loss": round(losses[-1], 6) if losses else last_logged_loss(metrics_path),  # as metrics.jsonl
        "forgetting": fgt,
    }
    if rt.world > 1:
        summary["processes"] = rt.world
        summary["strategy"] = getattr(rt, "strategy", None)
        summary["peak_memory_mb_per_rank"] = peaks
    if hooks_report(hooks):
        summary["regularize"] = hooks_report(hooks)
    storage = _storage_report(model)
    if storage:
        summary["storage_bytes"] = storage
    atomic_write_bytes(out_dir / "summary.json", dumps_json(summary, indent=2).encode())
    return RunResult(out_dir, summary, losses, interrupted)


def _make_run_dir(cfg: TrainConfig, out_dir: Path, is_main: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if not is_main:  # only rank 0 writes files
        return
    with contextlib.suppress(FileNotFoundError):
        (out_dir / "error.txt").unlink()  # a resumed run that fails again writes a new one
    # "processes": how many shared the global batch (rundir.claim lets --resume change grad_accum with it)
    stored = {**to_dict(cfg), "processes": int(os.environ.get("WORLD_SIZE", "1"))}
    atomic_write_bytes(out_dir / "config.json", json.dumps(stored, indent=2).encode())


def _log_step(metrics: Any, rec: dict[str, Any], bar: Any, log_every: int, total: int) -> None:
    """One metrics.jsonl record per step; the progress bar, or a log line every ``log_every`` steps."""
    metrics.write(dumps_json(rec) + "\n")
    metrics.flush()
    bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
    bar.update(1)
    if log_every and rec["step"] % log_every == 0:
        log.info("step %d/%d: loss %.4f, lr %.3g%s", rec["step"], total, rec["loss"], rec["lr"],
                 f", eval loss {rec['eval_loss']:.4f}" if "eval_loss" in rec else "")


def _gradient_checkpointing(model: nn.Module, on: bool) -> None:
    hf: Any = model
    if on and hasattr(hf, "gradient_checkpointing_enable"):
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(hf, "enable_input_require_grads"):
            hf.enable_input_require_grads()


def _storage_report(model: nn.Module) -> dict[str, int]:
    try:
        from ..quant.linear4bit import model_storage_report
    except ImportError:
        return {}
    return dict(model_storage_report(model))

