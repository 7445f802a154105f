"""Element-wise merge operators over stacked task tensors (TIES, DARE, magnitude pruning, DELLA,
breadcrumbs): pure functions, no model.

The PEFT ones reproduce ``peft.utils.merge_utils`` operation for operation (so a migrating user gets
the same numbers), with one change: DARE's Bernoulli masks come from an explicit
``torch.Generator`` instead of the global RNG, so a merge is reproducible from its seed and never
perturbs a caller's random stream. A fresh generator seeded with ``s`` draws the same masks as
``torch.manual_seed(s)`` followed by PEFT's calls in the same order (tested).

A "task tensor" is one adapter's tensor for one module (ΔWᵢ = sᵢ·BᵢAᵢ (d, k), or Aᵢ / Bᵢ alone
for PEFT's factor-wise types); ``weights`` holds one λᵢ per tensor.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["prune_magnitude", "prune_random", "prune_della", "prune_breadcrumbs", "majority_sign_mask",
           "disjoint_merge", "weighted_sum", "merge_tensors", "SPARSIFIERS"]

SignMethod = Literal["total", "frequency"]


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1] (the fraction of entries kept), got {density!r}")


def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density·n⌋ entries of largest |t| (TIES step 1, Yadav et al. 2023 §3)."""
    _check_density(density)
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    k = int(density * t.numel())
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE (Yu et al. 2024 §3): drop each entry with probability 1 − density, rescale the kept ones
    by 1/density so E[result] = t."""
    _check_density(density)
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def prune_della(t: torch.Tensor, density: float, generator: torch.Generator | None,
                epsilon: float = 0.1) -> torch.Tensor:
    """DELLA's MagPrune (Deep et al. 2024 §3.1; mergekit's ``della_magprune``): within each row, the
    keep probability grows linearly with the entry's magnitude rank from density − ε to density + ε;
    kept entries are rescaled by 1/p so E[result] = t. t: (d, k)."""
    _check_density(density)
    if density >= 1:
        return t
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1); got density={density}, epsilon={epsilon}")
    rows = t.reshape(t.shape[0], -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(rows.dtype)  # 0 = smallest |t| in its row
    span = (rows.shape[1] - 1) or 1
    probs = (density - epsilon) + (ranks / span) * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator)
    return (rows * mask / probs).reshape(t.shape)


def prune_breadcrumbs(t: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024; mergekit's ``magnitude_outliers``): drop the
    ⌊γ·n⌋ largest-|t| outliers and then the smallest entries, keeping ⌊density·n⌋."""
    _check_density(density)
    if density >= 1:
        return t
    n = t.numel()
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    order = t.abs().reshape(-1).argsort()  # ascending
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[order[n_bot: n - n_top]] = 1
    return t * mask.reshape(t.shape)


def majority_sign_mask(stacked: torch.Tensor, method: SignMethod = "total") -> torch.Tensor:
    """TIES step 2 (elect sign): per entry, the sign of Σᵢ tᵢ ('total') or of Σᵢ sign(tᵢ)
    ('frequency'); 0 counts as +. stacked: (n, …) → bool mask (n, …) of entries that agree."""
    sign = stacked.sign()
    if method == "total":
        magnitude = stacked.sum(dim=0)
    elif method == "frequency":
        magnitude = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {method!r}")
    majority = torch.where(magnitude >= 0, 1, -1)
    return sign == majority


def disjoint_merge(weighted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """TIES step 3: mean over the adapters whose (pruned) entry agrees with the elected sign."""
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _reshape_weights(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (stacked.dim() - weights.dim()))


def weighted_sum(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Σᵢ λᵢ·tᵢ (PEFT's task_arithmetic on tensors)."""
    stacked = torch.stack(tensors, dim=0)
    return (stacked * _reshape_weights(stacked, weights)).sum(dim=0)


#: sparsifier name → (prune one task tensor, does it draw random numbers)
SPARSIFIERS = ("none", "magnitude", "random", "della", "breadcrumbs")


def merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, *, sparsify: str, consensus: bool,
                  density: float | None, majority_sign_method: SignMethod = "total",
                  generator: torch.Generator | None = None, epsilon: float = 0.1,
                  gamma: float = 0.01) -> torch.Tensor:
    """Prune each task tensor, optionally elect signs (TIES), then combine with weights λ — the shared
    shape of PEFT's ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` and of DELLA and
    breadcrumbs. Tensors are pruned in list order (the order DARE's draws follow)."""
    if sparsify != "none":
        if density is None:
            raise ValueError(f"density is required for this combination (sparsifier {sparsify!r}); e.g. density=0.5")
        if sparsify == "magnitude":
            tensors = [prune_magnitude(t, density) for t in tensors]
        elif sparsify == "random":
            tensors = [prune_random(t, density, generator) for t in tensors]
        elif sparsify == "della":
            tensors = [prune_della(t, density, generator, epsilon) for t in tensors]
        elif sparsify == "breadcrumbs":
            tensors = [prune_breadcrumbs(t, density, gamma) for t in tensors]
        else:
            raise ValueError(f"unknown sparsifier {sparsify!r}; one of {SPARSIFIERS}")
    if not consensus:
        return weighted_sum(tensors, weights)
    stacked = torch.stack(tensors, dim=0)
    mask = majority_sign_mask(stacked, majority_sign_method)  # elected on the unweighted tensors, as PEFT
    return disjoint_merge(stacked * _reshape_weights(stacked, weights), mask)
