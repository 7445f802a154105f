"""L2-SP (Li, Grandvalet & Davoine 2018) as a training hook: λ/2·‖θ − θ₀‖² to the starting weights.

Same sites as EWC (:mod:`deltatune.regularize.sites`) with unit weights: for full/partial/head
fine-tuning θ − θ₀ per trained parameter; for LoRA the effective change s·BA of every adapted layer,
so the penalty is on what the adapter does to the weights, not on the raw factors (A starts random).
θ₀ of trained parameters is in the checkpoint (``star.<param>``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import L2spConfig
from .sites import Site, quadratic

__all__ = ["L2spHook"]


class L2spHook:
    name = "l2sp"

    def __init__(self, cfg: L2spConfig, site_list: list[Site]) -> None:
        self.cfg = cfg
        self.sites = site_list

    def penalty(self) -> torch.Tensor:
        return 0.5 * self.cfg.weight * quadratic(self.sites)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.penalty()

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {f"star.{s.name}": s.star for s in self.sites if s.star is not None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        t = state.get("tensors", {})
        for s in self.sites:
            if s.star is not None:
                s.star.copy_(t[f"star.{s.name}"])

    def report(self) -> dict[str, Any]:
        return {"weight": self.cfg.weight, "sites": len(self.sites)}
