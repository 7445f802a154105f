"""The ``regularize:`` config section: EWC, L2-SP and KL-to-base penalties (each 0 = off)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["EwcConfig", "L2spConfig", "KlConfig", "RegularizeConfig"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class EwcConfig:
    """Elastic weight consolidation (Kirkpatrick et al. 2017): λ/2·Σ F_i (θ_i − θ*_i)², F the diagonal Fisher."""

    weight: float = field(default=0.0, metadata=_doc("λ of the EWC penalty; 0 = off."))
    estimator: Literal["empirical", "sampled"] = field(
        default="empirical", metadata=_doc(
            "Fisher from the data's labels ('empirical') or from labels sampled from the model ('sampled', the true Fisher)."))
    samples: int = field(default=64, metadata=_doc("Examples in the Fisher estimate (one backward pass each)."))
    data: str = field(
        default="reference", metadata=_doc(
            "Fisher data (the old task): 'reference' (forgetting's reference text), 'train', 'eval', or a data file."))
    fisher_file: str | None = field(
        default=None, metadata=_doc(
            "Reuse a saved Fisher instead of estimating one: a run's checkpoint dir (or its optimizer.safetensors) "
            "or a file written by deltatune.regularize.ewc.save_fisher."))
    online: bool = field(
        default=False, metadata=_doc(
            "Online EWC: after the last step, estimate the Fisher on this run's training data and store "
            "decay·F_old + F_new (and θ* = the trained weights) in the final checkpoint, for the next task."))
    decay: float = field(default=1.0, metadata=_doc("Online EWC: γ, the weight of the previous tasks' Fisher."))

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"regularize.ewc.weight must be >= 0 (0 = off), got {self.weight}")
        if self.samples < 1:
            raise ValueError(f"regularize.ewc.samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"regularize.ewc.decay must be in [0, 1], got {self.decay}")
        if not self.data.strip():
            raise ValueError("regularize.ewc.data is empty: 'reference', 'train', 'eval' or a data file")


@dataclass
class L2spConfig:
    """L2-SP (Li et al. 2018): λ/2·‖θ − θ₀‖² to the starting weights (for LoRA: λ/2·‖s·BA‖²)."""

    weight: float = field(default=0.0, metadata=_doc("λ of the L2-SP penalty; 0 = off."))

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"regularize.l2sp.weight must be >= 0 (0 = off), got {self.weight}")


@dataclass
class KlConfig:
    """λ·mean KL(p_base ‖ p_θ) of next-token distributions on the forgetting reference set."""

    weight: float = field(default=0.0, metadata=_doc("λ of the KL-to-base penalty; 0 = off."))
    batch_size: int = field(default=2, metadata=_doc("Reference rows per penalty evaluation (cycled deterministically)."))

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"regularize.kl.weight must be >= 0 (0 = off), got {self.weight}")
        if self.batch_size < 1:
            raise ValueError(f"regularize.kl.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class RegularizeConfig:
    """Penalties that keep the model near the base (against forgetting), for any method."""

    ewc: EwcConfig = field(default_factory=EwcConfig, metadata=_doc("Elastic weight consolidation."))
    l2sp: L2spConfig = field(default_factory=L2spConfig, metadata=_doc("L2 to the starting weights."))
    kl: KlConfig = field(default_factory=KlConfig, metadata=_doc("KL to the base model on the reference set."))
