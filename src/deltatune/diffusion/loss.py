"""The DreamBooth objective's arithmetic as plain functions (Ruiz et al. 2023, eq. 2):

    L = E‖t − f_θ(z_t, c_inst)‖² + λ·E‖t − f_θ(z_t^pr, c_class)‖²

where the target t is ε (``prediction_type='epsilon'``), the velocity v = √ᾱ·ε − √(1−ᾱ)·x₀
(``'v_prediction'``) or x₀ (``'sample'``), as the scheduler says.

A batch holds 2B rows — B instance rows and B prior rows, in any order — and a boolean ``is_prior``
per row. Every per-row tensor (prediction, target, timestep, Min-SNR weight, prompt embedding) is
split by :func:`split_rows` with that one mask, so a row's loss, weight and prompt can never come
from different rows. The peers' scripts instead ``chunk(2)`` each tensor separately, and lost the
pairing more than once (class rows encoded with the instance prompt; ``repeat`` where
``repeat_interleave`` was meant; Min-SNR weights of the doubled batch broadcast onto half of it).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["diffusion_target", "split_rows", "per_row_mse", "min_snr_weights", "prior_preservation_loss"]


def diffusion_target(prediction_type: str, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict for ``z_t = √ᾱ_t·latents + √(1−ᾱ_t)·noise``. Shapes (N, C, h, w)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported; expected 'epsilon', "
                     "'v_prediction' or 'sample'")


def split_rows(is_prior: torch.Tensor, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """([t[instance rows] for t in tensors], [t[prior rows] for t in tensors]) with one row mask.

    ``is_prior``: bool (N,). Each tensor's dim 0 must be the same N rows; a mismatch is an error
    rather than a silent broadcast."""
    if is_prior.dtype != torch.bool or is_prior.dim() != 1:
        raise ValueError(f"is_prior must be a 1-D bool tensor, got {is_prior.dtype} of shape {tuple(is_prior.shape)}")
    n = is_prior.shape[0]
    for i, t in enumerate(tensors):
        if t.shape[0] != n:
            raise ValueError(f"split_rows: tensor {i} has {t.shape[0]} rows, the batch has {n} (is_prior)")
    inst = ~is_prior
    return [t[inst] for t in tensors], [t[is_prior] for t in tensors]


def per_row_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each row over all its other dims, in fp32: (N, ...) → (N,)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023), one per row from that row's own timestep:
    min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction, min(SNR, γ) for x₀."""
    acp = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]  # (N,)
    snr = acp / (1.0 - acp)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def prior_preservation_loss(pred: torch.Tensor, target: torch.Tensor, is_prior: torch.Tensor,
                            prior_weight: float = 1.0, row_weights: torch.Tensor | None = None,
                            reduction: str = "mean") -> torch.Tensor:
    """DreamBooth's loss over one batch of instance and prior rows (fp32 scalar).

    pred, target: (N, C, h, w); is_prior: bool (N,); row_weights: (N,) (e.g. :func:`min_snr_weights`)
    or None. ``reduction='mean'``: mean over instance rows + λ·mean over prior rows (the reference
    scripts' value, each MSE a mean over the row's elements). ``'sum'``: Σ instance + λ·Σ prior, for a
    loop that divides by the number of instance rows in a gradient-accumulation window (equal to
    'mean' when each batch pairs every instance row with one prior row).
    """
    per = per_row_mse(pred, target)  # (N,)
    if row_weights is not None:
        if row_weights.shape != per.shape:
            raise ValueError(f"row_weights must have one weight per row {tuple(per.shape)}, got {tuple(row_weights.shape)}")
        per = per * row_weights.float()
    (inst,), (prior,) = split_rows(is_prior, per)
    if reduction == "sum":
        return inst.sum() + prior_weight * prior.sum()
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if inst.numel() == 0:
        raise ValueError("prior_preservation_loss: the batch has no instance rows")
    loss = inst.mean()
    if prior.numel():
        loss = loss + prior_weight * prior.mean()
    return loss
