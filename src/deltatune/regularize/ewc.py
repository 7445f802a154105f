"""Elastic weight consolidation as a training hook (Kirkpatrick et al. 2017; online: Schwarz et al. 2018).

Penalty, added once per optimizer step: λ/2 · Σ_i F_i (θ_i − θ*_i)², over the run's sites
(:mod:`deltatune.regularize.sites`): every trained parameter for full/partial/head fine-tuning, and
for LoRA the adapted base weights with θ − θ* = s·BA (θ* = W₀).

Diagonal Fisher: F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)², one backward pass per example n, ℓ_n the
objective's own loss of that example per loss unit (``loss_sum / weight``, e.g. the mean token
loss). ``empirical``: the data's labels; ``sampled``: labels drawn from the model's own predictive
distribution at every labelled position (a seeded generator), which estimates the true Fisher.
For LoRA sites the gradient is taken with respect to W₀ itself (made differentiable for the
estimate only).

Saved state (``state_dict()["tensors"]``, so in every checkpoint): ``fisher.<site>``, and
``star.<site>`` for full-fine-tuning sites. Online EWC writes ``next_fisher.<site>`` = γ·F + F_new
(F_new on this run's training data at the final weights) and ``next_star.<site>`` after the last
step; ``regularize.ewc.fisher_file`` reads a checkpoint (preferring the ``next_*`` tensors) or a
file from :func:`save_fisher`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from .config import EwcConfig
from .sites import Site, at_least_fp32, quadratic, whole

__all__ = ["EwcHook", "fisher_diagonal", "sample_labels", "save_fisher", "load_fisher"]

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


@torch.no_grad()
def sample_labels(model: nn.Module, batch: Batch, generator: torch.Generator) -> Batch:
    """``batch`` with its labels replaced by samples from the model's predictive distribution.

    Causal LM (labels shaped like input_ids): y_{t+1} ~ p(·|x_≤t) at every labelled position.
    Classification (labels (B,), logits (B, C)): y ~ p(·|x)."""
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    new = labels.clone()
    if labels.shape == batch["input_ids"].shape and out.ndim == 3:
        keep = labels[:, 1:] != -100  # (B, T-1)
        probs = F.softmax(out[:, :-1][keep].float(), dim=-1)  # (N, V)
        new[:, 1:][keep] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        return {**batch, "labels": new}
    if labels.ndim == 1 and out.ndim == 2:
        return {**batch, "labels": torch.multinomial(F.softmax(out.float(), -1), 1, generator=generator).squeeze(-1)}
    raise ValueError(f"regularize.ewc.estimator=sampled: cannot sample labels shaped {tuple(labels.shape)} from logits "
                     f"{tuple(out.shape)}; use estimator=empirical")


def fisher_diagonal(model: nn.Module, site_list: Sequence[Site], batches: Iterable[Batch], loss_fn: LossFn, *,
                    estimator: str = "empirical", seed: int = 0, progress: bool = False,
                    total: int | None = None) -> dict[str, torch.Tensor]:
    """F per site (fp32, shaped like the site's tensor): the mean over ``batches`` (one example each)
    of the squared gradient of ``loss_fn``. Dropout off (eval mode); requires_grad restored."""
    tensors = [s.param for s in site_list]
    flags = [t.requires_grad for t in tensors]
    acc = [torch.zeros_like(at_least_fp32(t.detach())) for t in tensors]
    device = tensors[0].device
    gen = torch.Generator(device=device).manual_seed(seed)
    was = model.training
    model.eval()
    n = 0
    try:
        for t in tensors:
            t.requires_grad_(True)
        for b in tqdm(batches, total=total, desc="fisher", unit="ex", disable=not progress, dynamic_ncols=True):
            b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            if estimator == "sampled":
                b = sample_labels(model, b, gen)
            grads = torch.autograd.grad(loss_fn(model, b), tensors, allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(at_least_fp32(g).square())
            n += 1
    finally:
        for t, f in zip(tensors, flags):
            t.requires_grad_(f)
        model.train(was)
    if n == 0:
        raise ValueError("regularize.ewc: no example to estimate the Fisher from")
    return {s.name: whole(a / n) for s, a in zip(site_list, acc)}  # whole: online EWC under FSDP2


def save_fisher(path: str | Path, fisher: dict[str, torch.Tensor], stars: dict[str, torch.Tensor],
                meta: dict[str, Any]) -> Path:
    """A reusable Fisher file: tensors ``fisher.<site>`` / ``star.<site>``, ``meta`` as JSON metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"fisher.{k}": v.contiguous().cpu() for k, v in fisher.items()}
    tensors.update({f"star.{k}": v.contiguous().cpu() for k, v in stars.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"deltatune_ewc": json.dumps(meta)})
    tmp.replace(path)
    return path


def _resolve(path: Path) -> Path:
    if path.is_dir():
        if (path / "optimizer.safetensors").is_file():
            return path / "optimizer.safetensors"
        found = sorted((path / "checkpoints").glob("step-*"))
        if found:
            return found[-1] / "optimizer.safetensors"
        raise FileNotFoundError(f"regularize.ewc.fisher_file: {path} holds no checkpoint")
    if not path.is_file():
        raise FileNotFoundError(f"regularize.ewc.fisher_file: {path} does not exist")
    return path


def load_fisher(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fisher, stars) by site name from a :func:`save_fisher` file or a checkpoint (``hook.ewc.*``
    tensors; an online run's ``next_*`` ones when present)."""
    file = _resolve(Path(path))
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
        prefix = "hook.ewc." if any(k.startswith("hook.ewc.") for k in keys) else ""
        nxt = any(k.startswith(prefix + "next_fisher.") for k in keys)
        fk, sk = (prefix + "next_fisher.", prefix + "next_star.") if nxt else (prefix + "fisher.", prefix + "star.")
        fisher = {k[len(fk):]: f.get_tensor(k) for k in keys if k.startswith(fk)}
        stars = {k[len(sk):]: f.get_tensor(k) for k in keys if k.startswith(sk)}
    if not fisher:
        raise ValueError(f"{file}: no EWC Fisher in it (expected tensors 'fisher.<param>' or a checkpoint of a run "
                         "with regularize.ewc.weight > 0)")
    return fisher, stars


def _check(site_list: Sequence[Site], fisher: dict[str, torch.Tensor], where: str) -> None:
    for s in site_list:
        f = fisher.get(s.name)
        if f is None:
            raise ValueError(f"{where}: no Fisher for {s.name!r} (the file was made for another model or method)")
        if tuple(f.shape) != tuple(s.param.shape):
            raise ValueError(f"{where}: Fisher for {s.name!r} is {tuple(f.shape)}, the model's is {tuple(s.param.shape)}")


class EwcHook:
    """λ/2·Σ F (θ − θ*)² on ``sites`` (see the module docstring)."""

    name = "ewc"

    def __init__(self, cfg: EwcConfig, site_list: list[Site], fisher: dict[str, torch.Tensor], *,
                 total_steps: int = 0, online: Callable[[], dict[str, torch.Tensor]] | None = None,
                 seconds: float = 0.0) -> None:
        self.cfg = cfg
        self.sites = site_list
        _check(site_list, fisher, "regularize.ewc")
        device = site_list[0].param.device
        self.fisher = {s.name: fisher[s.name].to(device=device, dtype=at_least_fp32(s.param.detach()).dtype)
                       for s in site_list}
        self.total_steps = total_steps
        self.online = online  # estimates F_new on this run's task at the final weights
        self.next: dict[str, dict[str, torch.Tensor]] = {}
        self.fisher_seconds = seconds
        self.awaiting_checkpoint = False  # resuming: F and θ* come from the checkpoint (load_state_dict)

    @classmethod
    def create(cls, cfg: EwcConfig, site_list: list[Site], batches: Callable[[], Iterable[Batch]], loss_fn: LossFn,
               model: nn.Module, *, seed: int = 0, samples_total: int | None = None, total_steps: int = 0,
               online_batches: Callable[[], Iterable[Batch]] | None = None, progress: bool = False,
               resuming: bool = False) -> EwcHook:
        """Estimate the Fisher (or read ``cfg.fisher_file``) and build the hook. ``resuming``: a
        checkpoint will supply F and θ* (:meth:`load_state_dict`), so nothing is estimated or read."""
        t0 = time.perf_counter()
        if resuming:
            fisher = {s.name: torch.zeros_like(s.param, dtype=torch.float32) for s in site_list}
        elif cfg.fisher_file:
            fisher, stars = load_fisher(cfg.fisher_file)
            _check(site_list, fisher, cfg.fisher_file)
            for s in site_list:  # the previous task's θ* when the file has one
                if s.star is not None and s.name in stars:
                    s.star.copy_(stars[s.name].to(s.star))
        else:
            fisher = fisher_diagonal(model, site_list, batches(), loss_fn, estimator=cfg.estimator, seed=seed,
                                     progress=progress, total=samples_total)
        online = None
        if cfg.online and online_batches is not None:
            def online() -> dict[str, torch.Tensor]:
                return fisher_diagonal(model, site_list, online_batches(), loss_fn, estimator=cfg.estimator,
                                       seed=seed + 1, progress=progress, total=cfg.samples)
        hook = cls(cfg, site_list, fisher, total_steps=total_steps, online=online, seconds=time.perf_counter() - t0)
        hook.awaiting_checkpoint = resuming
        return hook

    def penalty(self) -> torch.Tensor:
        """λ/2·Σ F (θ − θ*)², an fp32 scalar with gradients to what trains."""
        if self.awaiting_checkpoint:  # zeros in F would switch EWC off silently
            raise RuntimeError("regularize.ewc: resumed from a checkpoint without EWC state (the run that wrote "
                               "it had regularize.ewc.weight = 0?); resume with the same config")
        return 0.5 * self.cfg.weight * quadratic(self.sites, self.fisher)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.penalty()

    def after_step(self, step: int) -> None:
        if self.online is not None and step == self.total_steps - 1:
            new = self.online()
            self.next = {
                "next_fisher": {k: self.cfg.decay * self.fisher[k] + new[k] for k in self.fisher},
                "next_star": {s.name: at_least_fp32(whole(s.param.detach())).clone()
                              for s in self.sites if s.star is not None},
            }

    def state_dict(self) -> dict[str, Any]:
        tensors = {f"fisher.{k}": v for k, v in self.fisher.items()}
        tensors.update({f"star.{s.name}": s.star for s in self.sites if s.star is not None})
        for kind, d in self.next.items():
            tensors.update({f"{kind}.{k}": v for k, v in d.items()})
        return {"tensors": tensors, **self.report()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state.get("tensors", {})
        for k in self.fisher:
            self.fisher[k].copy_(t[f"fisher.{k}"])
        for s in self.sites:
            if s.star is not None:
                s.star.copy_(t[f"star.{s.name}"])
        # The estimate the checkpoint's run made (this run did not repeat it).
        self.fisher_seconds = float(state.get("fisher_seconds", self.fisher_seconds))
        self.awaiting_checkpoint = False

    def report(self) -> dict[str, Any]:
        return {"weight": self.cfg.weight, "estimator": self.cfg.estimator,
                "samples": 0 if self.cfg.fisher_file else self.cfg.samples,
                "data": f"fisher_file {self.cfg.fisher_file}" if self.cfg.fisher_file else self.cfg.data,
                "online": self.cfg.online, "decay": self.cfg.decay, "fisher_seconds": round(self.fisher_seconds, 2),
                "sites": len(self.sites)}
