"""The optimizer and learning-rate schedule of a run (AdamW or 8-bit AdamW; LoRA+ parameter groups)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["lr_lambda", "make_optimizer", "make_scheduler"]


def lr_lambda(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warm-up, then decay to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(cfg: Any, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and 1-D parameters."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.train.loraplus_ratio > 0:
        from ..methods.loraplus import loraplus_param_groups

        groups = loraplus_param_groups(model, cfg.train.lr, cfg.train.loraplus_ratio, cfg.train.weight_decay)
    kw: dict[str, Any] = {"lr": cfg.train.lr, "betas": tuple(cfg.train.betas), "eps": cfg.train.eps}
    if cfg.train.optimizer == "adamw8bit":
        from ..quant.optim8bit import AdamW8bit

        return AdamW8bit(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def make_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = cfg.train.warmup_steps or int(cfg.train.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, cfg.train.schedule))
