"""LoRA+ (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models"): B learns
faster than A, η_B = λ·η_A with λ ≈ 16 (paper §3, Theorem 1 and §4; PEFT's default ratio is 16).

(MISSION §6: the lecture's §3.8.1 states the reverse; the paper, its reference code and PEFT give B
the larger rate.) With B = 0 at the start and width n → ∞, equal rates leave either A's update
vanishing or B's exploding; η_B/η_A = Θ(n) keeps both feature updates Θ(1) (paper §3).

Groups, as PEFT's ``create_loraplus_optimizer`` builds them:
  A         factors A (and any other ≥2-D trainable tensor, e.g. modules_to_save)   lr,    weight_decay
  embedding A and B of adapters on nn.Embedding layers                           embedding_lr (see below)
  B         lora_B and other 1-D tensors (DoRA magnitudes, VeRA-style vectors)    lr·λ,  weight_decay
  B_no_decay biases and normalisation weights among those 1-D tensors              lr·λ,  0
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .lora import LoraLayer

__all__ = ["loraplus_param_groups"]

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm,)


def _norm_param_names(model: nn.Module) -> set[str]:
    """Parameters of normalisation layers (PEFT: ``ALL_LAYERNORM_LAYERS``; RMSNorm by class name)."""
    out: set[str] = set()
    for mname, module in model.named_modules():
        if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm")):
            out.update(f"{mname}.{p}" if mname else p for p, _ in module.named_parameters(recurse=False))
    return out


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                          embedding_lr: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ over the trainable parameters of ``model``; pass them to any
    ``torch.optim`` optimizer. B's learning rate is ``lr * ratio`` (the larger one), A's is ``lr``.

    ``embedding_lr``: learning rate of both factors of adapters on embedding layers (the paper's
    scaling argument does not carry over to one-hot inputs); None means ``lr``. PEFT defaults it to 1e-6.
    Each group has a ``"name"`` key ('A', 'embedding', 'B', 'B_no_decay'); empty groups are left out.
    """
    if lr <= 0 or ratio <= 0:
        raise ValueError(f"loraplus_param_groups: lr and ratio must be > 0, got lr={lr}, ratio={ratio}")
    norms = _norm_param_names(model)
    modules = dict(model.named_modules())
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Adapter tensors live in a ModuleDict/ParameterDict two levels below their layer:
        # '<layer>.lora_embedding_A.<adapter>' / '<layer>.lora_B.<adapter>.weight'.
        owner = modules.get(pname.rsplit(".", 2)[0]) if pname.count(".") >= 2 else None
        if isinstance(owner, LoraLayer) and owner.kind == "embedding":
            groups["embedding"].append(p)
        elif "lora_B" in pname or p.ndim == 1:
            decays = pname not in norms and "bias" not in pname
            groups["B" if decays else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (lr if embedding_lr is None else embedding_lr, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    return [{"params": ps, "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
            for g, ps in groups.items() if ps]
