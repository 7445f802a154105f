"""``objective: dreambooth`` — DreamBooth with prior preservation (MISSION §4) in the one training loop.

Model: a local diffusers Stable Diffusion pipeline directory (``model.spec``) as a
:class:`~deltatune.diffusion.pipeline.DiffusionModel` (UNet + text encoder; the VAE never trains).
Data: the instance images, and — with ``with_prior_preservation`` — the class images the frozen model
generates once and caches (``deltatune.diffusion.data.class_images``). Rows are (instance, prior)
pairs; a batch of B pairs is 2B image rows. Loss unit: an instance image — ``loss_sum`` is
Σ instance MSE + λ·Σ prior MSE, so the loop's division by the window's instance count gives the
reference scripts' mean(instance) + λ·mean(prior). Evaluation: a fixed-noise denoising loss on the
instance and the class images (cheap, also ``during``), and validation images + a grid PNG
(instance prompt, a new-context prompt, the class prompt) before and after. Saved as
``pytorch_lora_weights.safetensors`` in diffusers' layout (LoRA) or a full pipeline directory
``pipeline/`` (full fine-tuning).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import Batch, Objective, Splits, Stage

if TYPE_CHECKING:
    from ..train.runtime import Runtime

log = logging.getLogger("deltatune.train")

__all__ = ["DreamBooth", "DreamBoothConfig"]

def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class DreamBoothConfig:
    """The ``dreambooth:`` section (``deltatune dreambooth`` fills it from its flags)."""

    instance_dir: str = field(default="", metadata=_doc("Folder of the K subject images (png/jpg/webp/bmp)."))
    instance_prompt: str = field(default="", metadata=_doc("Prompt with the rare identifier, e.g. 'a sks dog'."))
    class_prompt: str = field(default="", metadata=_doc("The class alone, e.g. 'a dog' (prior images, drift)."))
    with_prior_preservation: bool = field(default=False, metadata=_doc("Add λ·prior loss on class images."))
    prior_loss_weight: float = field(default=1.0, metadata=_doc("λ, the prior term's weight."))
    num_class_images: int = field(default=100, metadata=_doc("Class images to generate (cached, topped up)."))
    class_dir: str = field(default="", metadata=_doc("Class-image cache folder; '' = under the deltatune cache."))
    train_text_encoder: bool = field(default=False, metadata=_doc("Also adapt/train the text encoder."))
    resolution: int = field(default=0, metadata=_doc("Training resolution in pixels; 0 = the pipeline's own."))
    center_crop: bool = field(default=True, metadata=_doc("Centre crop (else a random crop each step)."))
    random_flip: bool = field(default=False, metadata=_doc("Random horizontal flips."))
    precompute_latents: bool = field(default=True, metadata=_doc("Encode the images with the VAE once."))
    snr_gamma: float = field(default=0.0, metadata=_doc("Min-SNR-γ loss weighting per row; 0 = off."))
    class_seed: int = field(default=0, metadata=_doc("Seed of the class images (image i: its own generator)."))
    validation_prompts: list[str] = field(default_factory=list, metadata=_doc(
        "Prompts of the validation grid; [] = the instance prompt, '<instance prompt> on the beach', the class prompt."))
    num_validation_images: int = field(default=4, metadata=_doc("Images per validation prompt."))
    sample_steps: int = field(default=25, metadata=_doc("Sampler steps for class and validation images."))
    guidance_scale: float = field(default=3.0, metadata=_doc("Classifier-free guidance scale when sampling."))
    eval_images: int = field(default=8, metadata=_doc("Images of each kind in the fixed-noise eval loss."))

    def __post_init__(self) -> None:
        if self.prior_loss_weight < 0:
            raise ValueError(f"dreambooth.prior_loss_weight must be >= 0, got {self.prior_loss_weight}")
        if self.num_class_images < 0 or self.num_validation_images < 0:
            raise ValueError("dreambooth.num_class_images / num_validation_images must be >= 0")


def default_validation_prompts(c: DreamBoothConfig) -> list[str]:
    if c.validation_prompts:
        return list(c.validation_prompts)
    return [p for p in (c.instance_prompt, f"{c.instance_prompt} on the beach", c.class_prompt) if p]


class DreamBooth(Objective):
    name = "dreambooth"
    summary = "DreamBooth: ‖ε − ε_θ(z_t, c_inst)‖² + λ·‖ε − ε_θ(z_t^pr, c_class)‖² on a diffusers SD pipeline"
    Config = DreamBoothConfig

    def setup(self, cfg: Any, rt: Runtime, *, model: nn.Module | None = None,
              processor: Any = None) -> tuple[nn.Module, Any, Splits]:
        from ..diffusion import (
            DiffusionModel,
            DreamBoothSpec,
            identifier_warning,
            load_pipeline,
            pair_rows,
            prepare,
        )
        from ..train.config import section

        c = section(cfg, "dreambooth", DreamBoothConfig)
        self.c = c
        if cfg.method not in ("lora", "full"):
            raise ValueError(f"objective dreambooth trains with method 'lora' or 'full', not {cfg.method!r}")
        if cfg.method == "lora" and cfg.lora.target_modules == type(cfg)().lora.target_modules:
            from ..diffusion import TEXT_ENCODER_TARGETS, lora_target_regex

            regex = lora_target_regex(text_encoder_modules=TEXT_ENCODER_TARGETS if c.train_text_encoder else None)
            raise ValueError(f"dreambooth: lora.target_modules is the language-model default "
                             f"{cfg.lora.target_modules!r}; set the UNet attention projections, e.g. "
                             f"--set 'lora.target_modules={regex}' (deltatune dreambooth sets it for you)")
        if not c.instance_dir or not c.instance_prompt:
            raise ValueError("dreambooth.instance_dir and dreambooth.instance_prompt are required")
        if model is None:
            model = load_pipeline(cfg.model.spec, train_text_encoder=c.train_text_encoder, device=rt.device)
        if not isinstance(model, DiffusionModel):
            raise TypeError(f"objective dreambooth needs a DiffusionModel, got {type(model).__name__}")
        self.core = model
        warning = identifier_warning(model.tokenizer, c.instance_prompt, c.class_prompt or None)
        if warning:
            log.warning("%s", warning)
        class_dir = c.class_dir or str(self._default_class_dir(model, c))
        spec = DreamBoothSpec(instance_dir=c.instance_dir, instance_prompt=c.instance_prompt,
                              class_prompt=c.class_prompt or None, with_prior_preservation=c.with_prior_preservation,
                              class_dir=class_dir, num_class_images=c.num_class_images, resolution=c.resolution or None,
                              center_crop=c.center_crop, random_flip=c.random_flip,
                              precompute_latents=c.precompute_latents, seed=c.class_seed,
                              sample_steps=c.sample_steps, guidance_scale=c.guidance_scale)
        self.data = prepare(model, spec)
        pairs = pair_rows(len(self.data.instance), len(self.data.prior))
        self.prompts = default_validation_prompts(c)
        info = {"instance_images": len(self.data.instance), "class_images": len(self.data.prior),
                "pairs_per_epoch": len(pairs), "class_dir": class_dir if c.with_prior_preservation else None,
                "identifier_warning": warning}
        return model, model.tokenizer, Splits(train=pairs, eval=self.prompts, info=info)

    @staticmethod
    def _default_class_dir(model: Any, c: DreamBoothConfig) -> Path:
        from ..paths import cache_root

        key = hashlib.sha256(f"{model.base_fingerprint}|{c.class_prompt}".encode()).hexdigest()[:12]
        return cache_root() / "class-images" / key

    def collate(self, rows: Sequence[Any]) -> Batch:
        return self.data.collate(rows)

    def weight(self, batch: Batch) -> int:
        return int((~batch["is_prior"]).sum())  # instance images

    def _lambda(self) -> float:
        return self.c.prior_loss_weight if self.c.with_prior_preservation else 0.0

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        from ..diffusion import loss_sum

        return loss_sum(model, batch, prior_weight=self._lambda(), snr_gamma=self.c.snr_gamma or None,
                        core=self.core)

    @torch.no_grad()
    def _fixed_noise_loss(self, model: nn.Module) -> dict[str, float]:
        """Mean denoising MSE of the first ``eval_images`` instance and class images, with noise and
        timesteps from a fixed seed (the training RNG is left as it was)."""
        from ..diffusion import loss_sum

        out: dict[str, float] = {}
        n = self.c.eval_images
        was = model.training
        model.eval()
        try:
            for kind, pairs in (("instance", [(i % len(self.data.instance), None) for i in range(n)]),
                                ("prior", [(0, j) for j in range(min(n, len(self.data.prior)))])):
                if not pairs:
                    continue
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(1234)
                    batch = self.data.collate(pairs)
                    if kind == "prior":  # only the prior rows: every per-row tensor by the same mask
                        keep = batch["is_prior"]
                        batch = {k: v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == keep.shape else v
                                 for k, v in batch.items()}
                    total = loss_sum(model, batch, prior_weight=1.0, core=self.core)
                out[f"eval_{kind}_loss"] = float(total) / len(pairs)
        finally:
            model.train(was)
        return out

    def evaluate(self, model: nn.Module, splits: Splits, rt: Runtime, *, stage: Stage,
                 out_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._fixed_noise_loss(model))
        if stage == "during" or out_dir is None or not self.c.num_validation_images:
            return out
        from ..diffusion import save_grid
        from ..diffusion.data import load_image, save_png

        k = self.c.num_validation_images
        folder = out_dir / f"validation_{stage}"
        rows = []
        for p_i, prompt in enumerate(self.prompts):
            seeds = [1000 + s for s in range(k)]  # the same seeds before and after: comparable grids
            images = self.core.sample([prompt] * k, seeds, steps=self.c.sample_steps,
                                      guidance_scale=self.c.guidance_scale)
            for s, img in zip(seeds, images):
                save_png(folder / f"p{p_i}_s{s}.png", img)
            rows.append((f"{stage}: {prompt}", images))
        save_grid(out_dir / f"grid_{stage}.png", rows)
        out["grid"] = f"grid_{stage}.png"
        before = out_dir / "validation_before"
        if stage == "after" and before.is_dir():
            both = []
            for p_i, (label, images) in enumerate(rows):
                files = sorted(before.glob(f"p{p_i}_s*.png"))
                if files:
                    both.append((label.replace("after: ", "before: ", 1), torch.stack([load_image(f) for f in files])))
                both.append((label, images))
            save_grid(out_dir / "grid.png", both)
            out["grid"] = "grid.png"
        log.info("%s training: %s", stage, out)
        return out

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from ..diffusion import save_diffusers_lora

        info = {"instance_prompt": self.c.instance_prompt, "class_prompt": self.c.class_prompt,
                "with_prior_preservation": self.c.with_prior_preservation, "prior_loss_weight": self._lambda(),
                "base_model": str(self.cfg.model.spec), "base_fingerprint": self.core.base_fingerprint,
                "method": self.cfg.method}
        if self.cfg.method == "lora":
            save_diffusers_lora(model, out_dir, info=info)
            return
        self.core.save_pretrained(out_dir / "pipeline")
