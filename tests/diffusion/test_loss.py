"""prior_preservation_loss against the formula written out here (ε and v targets), Min-SNR weights
per row, and the one split helper's refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler  # noqa: E402

from deltatune.diffusion import (  # noqa: E402
    diffusion_target,
    min_snr_weights,
    prior_preservation_loss,
    split_rows,
)


def _naive(pred, target, is_prior, lam, w=None):
    inst = [((pred[i] - target[i]) ** 2).mean() * (1 if w is None else w[i]) for i in range(len(pred)) if not is_prior[i]]
    prior = [((pred[i] - target[i]) ** 2).mean() * (1 if w is None else w[i]) for i in range(len(pred)) if is_prior[i]]
    return sum(inst) / len(inst) + lam * sum(prior) / len(prior)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_prior_loss_matches_formula(prediction_type: str, lam: float) -> None:
    g = torch.Generator().manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    x0 = torch.randn(6, 4, 3, 3, generator=g)
    noise = torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([3, 999, 500, 10, 250, 700])
    is_prior = torch.tensor([False, True, False, True, False, True])
    pred = torch.randn(6, 4, 3, 3, generator=g)
    target = diffusion_target(prediction_type, sched, x0, noise, t)
    acp = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    naive_target = noise if prediction_type == "epsilon" else acp.sqrt() * noise - (1 - acp).sqrt() * x0
    torch.testing.assert_close(target, naive_target)
    got = prior_preservation_loss(pred, target, is_prior, lam)
    torch.testing.assert_close(got, torch.as_tensor(_naive(pred, naive_target, is_prior, lam)))
    # 'sum' = Σ instance + λ Σ prior; with B instance rows and B prior rows, sum / B == mean.
    s = prior_preservation_loss(pred, target, is_prior, lam, reduction="sum")
    torch.testing.assert_close(s / 3, got)
    # Order of rows is irrelevant: the mask, not the position, says which row is which.
    perm = torch.tensor([5, 2, 0, 1, 4, 3])
    torch.testing.assert_close(prior_preservation_loss(pred[perm], target[perm], is_prior[perm], lam), got)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_are_per_row(prediction_type: str) -> None:
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    t = torch.tensor([1, 999, 400, 50])
    w = min_snr_weights(sched, t, 5.0, prediction_type)
    for i, ti in enumerate(t.tolist()):
        a = float(sched.alphas_cumprod[ti])
        snr = a / (1 - a)
        expect = min(snr, 5.0) / (snr if prediction_type == "epsilon" else snr + 1)
        assert w[i].item() == pytest.approx(expect, rel=1e-5)
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(4, 2, 2, 2, generator=g), torch.randn(4, 2, 2, 2, generator=g)
    is_prior = torch.tensor([False, False, True, True])
    got = prior_preservation_loss(pred, target, is_prior, 1.0, row_weights=w)
    torch.testing.assert_close(got, torch.as_tensor(_naive(pred, target, is_prior, 1.0, w)))
    with pytest.raises(ValueError, match="one weight per row"):
        prior_preservation_loss(pred, target, is_prior, 1.0, row_weights=w[:2])


def test_split_rows_refuses_mismatched_rows() -> None:
    is_prior = torch.tensor([False, True])
    (a,), (b,) = split_rows(is_prior, torch.tensor([1.0, 2.0]))
    assert a.tolist() == [1.0] and b.tolist() == [2.0]
    with pytest.raises(ValueError, match="tensor 1 has 4 rows"):
        split_rows(is_prior, torch.zeros(2), torch.zeros(4))
    with pytest.raises(ValueError, match="bool"):
        split_rows(torch.tensor([0, 1]), torch.zeros(2))
    with pytest.raises(ValueError, match="prediction_type"):
        diffusion_target("flow", None, torch.zeros(1), torch.zeros(1), torch.zeros(1))
