"""The strategies that train a part of the model itself (no adapter): full, head, partial."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from ..structure import block_list, untie_output_head

if TYPE_CHECKING:
    from ..train.hooks import Hook, RunInfo

__all__ = ["PartialConfig", "apply_full", "apply_head", "apply_partial", "check_partial"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class PartialConfig:
    """Partial fine-tuning (method 'partial'): only the top blocks and named modules train."""

    top_n_layers: int = field(default=2, metadata=_doc("Number of top transformer blocks trained in full."))
    modules: list[str] = field(
        default_factory=list,
        metadata=_doc(
            "Extra modules trained in full, by exact name or dotted suffix (e.g. ['norm', 'lm_head'])."
        ),
    )

    def __post_init__(self) -> None:
        if self.top_n_layers < 0:
            raise ValueError(f"partial.top_n_layers must be >= 0, got {self.top_n_layers}")


def apply_full(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    model.requires_grad_(True)
    return []


def apply_head(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    model.requires_grad_(False)
    head = untie_output_head(model)
    if head is None:
        raise ValueError(f"method 'head': {type(model).__name__} has no output head (get_output_embeddings())")
    head.requires_grad_(True)
    return []


def check_partial(cfg: Any) -> None:
    if cfg.partial.top_n_layers == 0 and not cfg.partial.modules:
        raise ValueError("method 'partial' with partial.top_n_layers=0 and no partial.modules would train nothing: "
                         "set top_n_layers > 0 or list modules")


def apply_partial(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    model.requires_grad_(False)
    pcfg: PartialConfig = cfg.partial
    _, blocks = block_list(model)
    if pcfg.top_n_layers > len(blocks):  # min() trained fewer blocks than asked without a word
        raise ValueError(f"partial.top_n_layers={pcfg.top_n_layers}, but {type(model).__name__} has only "
                         f"{len(blocks)} blocks: use at most {len(blocks)}")
    n = pcfg.top_n_layers
    for block in list(blocks)[len(blocks) - n:]:
        block.requires_grad_(True)
    for name in pcfg.modules:
        hits = [m for path, m in model.named_modules() if path == name or path.endswith("." + name)]
        if not hits:
            names = sorted({p.split(".")[-1] for p, _ in model.named_modules() if p})
            raise ValueError(f"partial.modules: {name!r} matches no module; names include {names[:30]}")
        if name.endswith(("lm_head", "embed_tokens", "wte")):
            untie_output_head(model)
        for m in hits:
            m.requires_grad_(True)
    return []
