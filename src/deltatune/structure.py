"""Model anatomy shared by methods and objectives: the list of blocks, the output head."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["block_list", "output_head", "untie_output_head"]


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the longest ModuleList in the model (layers / h / layer / blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of blocks (nn.ModuleList)")
    return best


def output_head(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()`` when the model has one (transformers heads), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


def untie_output_head(model: nn.Module) -> nn.Module | None:
    """Give the output head its own weight when it shares the input embedding's (SmolLM2, GPT-2),
    so training the head leaves the embeddings — and thus the features — untouched."""
    get_in = getattr(model, "get_input_embeddings", None)
    head = output_head(model)
    emb = get_in() if callable(get_in) else None
    if head is None:
        return None
    if emb is not None and head.weight is emb.weight:
        head.weight = nn.Parameter(head.weight.detach().clone())
        config: Any = getattr(model, "config", None)
        if config is not None:
            config.tie_word_embeddings = False
    return head
