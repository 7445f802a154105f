"""DreamBooth batches: instance and prior rows together, each row carrying its own prompt.

An epoch is a list of (instance index, prior index) pairs (:func:`~deltatune.diffusion.data.pair_rows`);
:meth:`DreamBoothData.collate` turns B pairs into 2B rows, interleaved (instance, prior, instance, …),
and builds every per-row tensor — pixels or latents, token ids, prompt embeddings, ``is_prior`` —
from the one list of rows, so row i's prompt is always row i's own. :func:`loss_sum` then splits all
per-row tensors with :func:`~deltatune.diffusion.loss.split_rows` and the same ``is_prior`` mask.

Randomness (augmentation, the VAE sample, noise, timesteps) comes from torch's global generator,
which the training loop's checkpoints save and restore: a resumed run draws what an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .data import Augment, augment
from .loss import diffusion_target, min_snr_weights, prior_preservation_loss

__all__ = ["Example", "DreamBoothData", "loss_sum", "text_encoder_trains"]


@dataclass
class Example:
    """One training image: raw pixels (3, H, W) in [0, 1], or precomputed scaled latent (mean, std)
    pairs — one per flip when the augmentation flips — plus the index of its prompt."""

    prompt: int
    is_prior: bool
    pixels: torch.Tensor | None = None
    latents: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class DreamBoothData:
    """The prepared data: examples, the prompts' token ids (P, T) and, while the text encoder is
    frozen, their embeddings (P, T, D)."""

    instance: list[Example]
    prior: list[Example]
    prompts: list[str]
    input_ids: torch.Tensor
    aug: Augment
    prompt_embeds: torch.Tensor | None = None

    def rows_of(self, pairs: Sequence[tuple[int, int | None]]) -> list[Example]:
        rows: list[Example] = []
        for i, j in pairs:
            rows.append(self.instance[i])
            if j is not None:
                rows.append(self.prior[j])
        return rows

    def collate(self, pairs: Sequence[tuple[int, int | None]]) -> dict[str, Any]:
        rows = self.rows_of(pairs)
        batch: dict[str, Any] = {}
        if all(ex.latents for ex in rows):
            picks = [ex.latents[int(torch.randint(len(ex.latents), ()))] if len(ex.latents) > 1 else ex.latents[0]
                     for ex in rows]
            batch["latent_mean"] = torch.stack([m for m, _ in picks])  # (2B, C, h, w)
            batch["latent_std"] = torch.stack([s for _, s in picks])
        else:
            missing = [k for k, ex in enumerate(rows) if ex.pixels is None]
            if missing:
                raise ValueError(f"rows {missing} have neither pixels nor precomputed latents")
            batch["pixels"] = torch.stack([augment(ex.pixels, self.aug) for ex in rows])  # type: ignore[arg-type]
        prompt = torch.tensor([ex.prompt for ex in rows])  # (2B,): the one index every prompt tensor uses
        batch["prompt"] = prompt
        batch["input_ids"] = self.input_ids[prompt]  # (2B, T)
        if self.prompt_embeds is not None:
            batch["prompt_embeds"] = self.prompt_embeds[prompt]  # (2B, T, D)
        batch["is_prior"] = torch.tensor([ex.is_prior for ex in rows], dtype=torch.bool)
        return batch


def text_encoder_trains(model: Any) -> bool:
    return any(p.requires_grad for p in model.text_encoder.parameters())


def loss_sum(model: Any, batch: dict[str, Any], *, prior_weight: float = 1.0, snr_gamma: float | None = None,
             reduction: str = "sum", core: Any = None) -> torch.Tensor:
    """Σ instance-row losses + λ·Σ prior-row losses for one batch (fp32), through ``model(...)``.

    ``model`` is what the loop calls (a DiffusionModel, possibly wrapped); ``core`` the unwrapped
    DiffusionModel for its VAE and schedulers (default: ``model``). Precomputed prompt embeddings are
    used only while no text-encoder parameter trains; otherwise the token ids go through the text
    encoder inside the forward, so its adapter gets gradients."""
    core = core if core is not None else model
    device = next(core.unet.parameters()).device
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
    else:
        mean, std = core.latent_dist(batch["pixels"])
    latents = mean + std * torch.randn(mean.shape).to(device)  # the VAE's posterior sample, (N, C, h, w)
    noise = torch.randn(latents.shape).to(device)
    sched = core.noise_scheduler
    t = torch.randint(0, int(sched.config.num_train_timesteps), (latents.shape[0],)).to(device)  # per row
    noisy = sched.add_noise(latents, noise, t)
    target = diffusion_target(core.prediction_type, sched, latents, noise, t)
    if "prompt_embeds" in batch and not text_encoder_trains(core):
        pred = model(noisy, t, encoder_hidden_states=batch["prompt_embeds"].to(device))
    else:
        pred = model(noisy, t, input_ids=batch["input_ids"].to(device))
    weights = min_snr_weights(sched, t, snr_gamma, core.prediction_type) if snr_gamma else None
    return prior_preservation_loss(pred, target, batch["is_prior"].to(device), prior_weight, weights, reduction)


@dataclass
class DreamBoothSpec:
    """What :func:`prepare` needs (the CLI / config section fills it)."""

    instance_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    class_dir: str | None = None
    num_class_images: int = 100
    resolution: int | None = None  # default: the pipeline's native resolution
    center_crop: bool = True
    random_flip: bool = False
    precompute_latents: bool = True
    seed: int = 0
    sample_steps: int = 25
    guidance_scale: float = 3.0


def prepare(model: Any, spec: DreamBoothSpec, progress: bool = True) -> DreamBoothData:
    """Instance images, cached class images (generated by the frozen ``model`` where needed), the
    two prompts' token ids and — the text encoder still being the frozen base — their embeddings."""
    from pathlib import Path

    from .data import class_images, load_image, load_image_dir

    resolution = spec.resolution or model.resolution
    aug = Augment(resolution, spec.center_crop, spec.random_flip)
    prompts = [spec.instance_prompt]
    prior_imgs: list[torch.Tensor] = []
    if spec.with_prior_preservation:
        if not spec.class_prompt:
            raise ValueError("with_prior_preservation needs a class prompt (--class-prompt 'a dog')")
        if not spec.class_dir:
            raise ValueError("with_prior_preservation needs a class-image folder (--class-dir DIR)")
        prompts.append(spec.class_prompt)
        sampler = {"class": type(model.scheduler).__name__, **{k: v for k, v in dict(model.scheduler.config).items()
                                                               if not k.startswith("_")}}
        paths = class_images(
            Path(spec.class_dir), class_prompt=spec.class_prompt, count=spec.num_class_images, seed=spec.seed,
            resolution=model.resolution, steps=spec.sample_steps, guidance_scale=spec.guidance_scale,
            scheduler=sampler, base_fingerprint=model.base_fingerprint, progress=progress,
            generate=lambda p, seeds: model.sample([p] * len(seeds), seeds, steps=spec.sample_steps,
                                                   guidance_scale=spec.guidance_scale))
        prior_imgs = [load_image(p) for p in paths]
    inst_imgs = load_image_dir(spec.instance_dir, "instance")
    instance = [Example(prompt=0, is_prior=False, pixels=im) for im in inst_imgs]
    prior = [Example(prompt=1, is_prior=True, pixels=im) for im in prior_imgs]
    if spec.precompute_latents:
        if not spec.center_crop:
            raise ValueError("precompute_latents needs center_crop (a random crop changes the latent every step)")
        for ex in instance + prior:
            assert ex.pixels is not None
            views = [augment(ex.pixels, Augment(resolution, True, False))]
            if spec.random_flip:
                views.append(views[0].flip(-1))
            ex.latents = [tuple(t[0].cpu() for t in model.latent_dist(v[None])) for v in views]  # type: ignore[misc]
            ex.pixels = None
    input_ids = model.tokenize(prompts)  # (P, T)
    with torch.no_grad():
        embeds = model.encode_prompt(input_ids).detach().cpu()  # (P, T, D) of the frozen text encoder
    return DreamBoothData(instance, prior, prompts, input_ids, aug, embeds)
