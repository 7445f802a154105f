"""LoRA configuration (MISSION §2). A plain typed dataclass: the single source for the Python API,
the YAML config section ``lora:`` and the CLI ``--set lora.<field>=…`` overrides.

Field docstrings (the ``doc`` metadata) become ``deltatune train --help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["LoraConfig"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class LoraConfig:
    """h = W₀x + s·B(A·drop(x)), s = alpha/r (alpha/√r with rsLoRA); B = 0 at init."""

    r: int = field(default=8, metadata=_doc("LoRA rank r (A is r×k, B is d×r)."))
    alpha: float = field(default=16.0, metadata=_doc("Scale numerator: s = alpha/r (alpha/sqrt(r) with use_rslora)."))
    dropout: float = field(default=0.0, metadata=_doc("Dropout on the adapter input only (the base path sees x)."))
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_doc(
            "Modules to adapt: a list of exact names or dotted suffixes, a regex string (full match on "
            "the module path), or 'all-linear' (every linear layer except the output head)."
        ),
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata=_doc("Names/suffixes (list) or a regex (string) never adapted.")
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata=_doc("Only adapt these block indices (the number after 'layers.'/'h.'/'layer.').")
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata=_doc("Per-module rank overrides: regex on the module path → r.")
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata=_doc("Per-module alpha overrides: regex on the module path → alpha.")
    )
    use_rslora: bool = field(default=False, metadata=_doc("Rank-stabilised scale alpha/sqrt(r) (Kalajdzievski 2023)."))
    init: str = field(
        default="kaiming",
        metadata=_doc(
            "Init scheme: 'kaiming' (PEFT default, Kaiming-uniform a=√5) or 'gaussian' (σ = 1/√k) for A with "
            "B = 0; or 'pissa' / 'pissa_niter_K' (top-r SVD of W₀, full or randomized with K iterations) or "
            "'olora' (QR of W₀), which move that part of W₀ into A, B and leave the residual in the base."
        ),
    )
    use_dora: bool = field(
        default=False,
        metadata=_doc("DoRA (Liu et al. 2024): W' = m·(W₀ + s·BA)/‖W₀ + s·BA‖_c with a trainable magnitude m."),
    )
    bias: str = field(default="none", metadata=_doc("Trainable biases: 'none', 'all', or 'lora_only'."))
    modules_to_save: list[str] = field(
        default_factory=list,
        metadata=_doc("Modules (names/suffixes) trained in full as a copy, e.g. a classification head."),
    )

    def __post_init__(self) -> None:
        from deltatune.validate import number, numbers

        number("lora.r", self.r, integer=True, ge=1)
        # alpha = 0 makes s = 0: the adapter adds nothing and gets zero gradients, so nothing trains.
        number("lora.alpha", self.alpha, gt=0, hint="s = alpha/r scales the update; 0 would train nothing")
        number("lora.dropout", self.dropout, ge=0, lt=1)
        numbers("lora.rank_pattern", self.rank_pattern, integer=True, ge=1)
        numbers("lora.alpha_pattern", self.alpha_pattern, gt=0)
        for i, idx in enumerate(self.layers_to_transform or []):
            number(f"lora.layers_to_transform[{i}]", idx, integer=True, ge=0)
        from deltatune.methods import lora_init

        if not lora_init.is_known(self.init):  # at load time, not after the model is loaded
            lora_init.check_targets(self.init, [])
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if isinstance(self.target_modules, list | tuple) and not self.target_modules:
            raise ValueError("LoraConfig.target_modules is empty: name at least one module, a regex, or 'all-linear'")
