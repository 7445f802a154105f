"""A Stable Diffusion pipeline directory as one trainable module, plus sampling, grids and checks.

:class:`DiffusionModel` holds the UNet and the text encoder as submodules — an adapter (or full
fine-tuning) spans both, and their module paths ``unet.…`` / ``text_encoder.…`` are exactly the key
prefixes of diffusers' LoRA files. The VAE, the tokenizer and the schedulers ride along outside the
module tree: the VAE is never trained and never part of a checkpoint.

Sampling goes through diffusers' own ``StableDiffusionPipeline`` built around these modules, so the
images deltatune shows are the images diffusers generates from the same weights and seeds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DiffusionModel", "load_pipeline", "base_fingerprint", "save_grid", "identifier_warning"]


def base_fingerprint(*modules: nn.Module) -> str:
    """sha256 over (parameter name, shape, Σ|w| of a strided sample) of every parameter: cheap (no
    full pass over the weights) and it changes when any weight tensor changes materially."""
    from ..methods.lora import weight_checksum

    rows = [[type(m).__name__, [[n, list(p.shape), round(weight_checksum(p), 6)] for n, p in m.named_parameters()]]
            for m in modules]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


class DiffusionModel(nn.Module):
    """``unet`` + ``text_encoder`` as one module; ``forward`` is the UNet's noise prediction.

    forward(noisy (N, C, h, w), timesteps (N,), input_ids (N, T) | encoder_hidden_states (N, T, D))
    → prediction (N, C, h, w). With ``input_ids`` the prompt goes through the text encoder inside
    this call (so text-encoder adapters train); with precomputed embeddings it does not.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module, tokenizer: Any,
                 scheduler: Any, train_text_encoder: bool = True) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        self.unet = unet
        vae.requires_grad_(False)
        vae.eval()
        # Plain attributes, not submodules: no method can train the VAE (nor a text encoder that is
        # to stay frozen — 'full' then means the UNet), no state_dict or checkpoint holds them.
        self.__dict__["vae"] = vae
        if train_text_encoder:
            self.text_encoder = text_encoder
        else:
            text_encoder.requires_grad_(False)
            text_encoder.eval()
            self.__dict__["text_encoder"] = text_encoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler  # the sampler (the pipeline's scheduler folder)
        self.noise_scheduler = DDPMScheduler.from_config(scheduler.config)  # training noise, as the peers do
        self.base_fingerprint = base_fingerprint(unet, text_encoder, vae)

    vae: nn.Module
    text_encoder: nn.Module

    @property
    def text_encoder_is_submodule(self) -> bool:
        return "text_encoder" in self._modules

    def _apply(self, fn: Any, recurse: bool = True) -> DiffusionModel:  # .to()/.half() reach the VAE too
        self.vae._apply(fn)
        if not self.text_encoder_is_submodule:
            self.text_encoder._apply(fn)
        return super()._apply(fn, recurse)  # type: ignore[return-value]

    @property
    def prediction_type(self) -> str:
        return str(self.noise_scheduler.config.prediction_type)

    @property
    def resolution(self) -> int:
        unet: Any = self.unet
        return int(unet.config.sample_size) * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # type: ignore[union-attr,arg-type]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """(N, T) token ids, padded/truncated to the tokenizer's max length, as the pipeline does."""
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids

    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(N, T) → (N, T, D): the text encoder's last hidden state (SD's conditioning)."""
        return self.text_encoder(input_ids.to(self._device()))[0]

    @torch.no_grad()
    def latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, R, R) in [-1, 1] → the scaled latent distribution's (mean, std), each (N, C, R/f, R/f)."""
        dist = self.vae.encode(pixels.to(self._device(), self._vae_dtype())).latent_dist  # type: ignore[operator]
        s = float(self.vae.config.scaling_factor)  # type: ignore[union-attr,arg-type]
        return dist.mean.float() * s, dist.std.float() * s

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor | None = None,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("DiffusionModel.forward needs input_ids or encoder_hidden_states")
            encoder_hidden_states = self.encode_prompt(input_ids)
        if encoder_hidden_states.shape[0] != noisy.shape[0]:
            raise ValueError(f"{encoder_hidden_states.shape[0]} prompt embeddings for {noisy.shape[0]} latents")
        return self.unet(noisy, timesteps, encoder_hidden_states).sample  # type: ignore[operator]

    def _device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def pipeline(self) -> Any:
        """diffusers' StableDiffusionPipeline around these very modules (adapters included)."""
        from diffusers import StableDiffusionPipeline

        pipe: Any = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                            unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], *, steps: int = 25,
               guidance_scale: float = 3.0, negative_prompt: str | None = None) -> torch.Tensor:
        """One image per (prompt, seed): (N, 3, R, R) in [0, 1]. Each image has its own generator,
        so an image does not depend on which others share its batch."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        was = self.training
        self.eval()
        self.text_encoder.eval()
        try:
            gens = [torch.Generator(self._device()).manual_seed(int(s)) for s in seeds]
            out = self.pipeline()(list(prompts), num_inference_steps=steps, guidance_scale=guidance_scale,
                                  negative_prompt=[negative_prompt] * len(prompts) if negative_prompt else None,
                                  generator=gens, output_type="pt")
        finally:
            self.train(was)
        return out.images.float().cpu()  # type: ignore[no-any-return]

    def save_pretrained(self, out: str | Path) -> Path:
        """A complete pipeline directory (after full fine-tuning): ``from_pretrained(out)`` loads it."""
        from .miniature import save_pipeline

        return save_pipeline({"vae": self.vae, "unet": self.unet, "text_encoder": self.text_encoder,
                              "tokenizer": self.tokenizer, "scheduler": self.scheduler}, out)


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, train_text_encoder: bool = True,
                  device: torch.device | str = "cpu") -> DiffusionModel:
    """A local diffusers Stable Diffusion directory (model_index.json + unet/vae/text_encoder/tokenizer/
    scheduler) as a :class:`DiffusionModel`, frozen, in eval mode. ``train_text_encoder=False`` keeps
    the text encoder out of the module tree (no method can train it)."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    index = path / "model_index.json"
    if not index.exists():
        raise ValueError(f"--model {path}: not a diffusers pipeline directory (no model_index.json)")
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / p).is_dir()]
    if missing:
        raise ValueError(f"--model {path}: a Stable Diffusion directory needs the folders {missing}")
    pipe = StableDiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False)
    model = DiffusionModel(pipe.unet, pipe.text_encoder, pipe.vae, pipe.tokenizer, pipe.scheduler,
                           train_text_encoder=train_text_encoder)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def save_grid(path: str | Path, rows: Sequence[tuple[str, torch.Tensor]], scale: int = 4) -> Path:
    """One labelled row per (label, images (n, 3, R, R) in [0, 1]); images upscaled ×``scale``
    (nearest) so a 16-pixel miniature is visible. Written atomically as PNG."""
    from PIL import Image, ImageDraw

    from ..io import atomic_write_bytes

    path = Path(path)
    if not rows:
        raise ValueError("save_grid: no rows")
    r = rows[0][1].shape[-1] * scale
    label_w = 8 + 7 * max(len(label) for label, _ in rows)
    n = max(len(imgs) for _, imgs in rows)
    canvas = Image.new("RGB", (label_w + n * (r + 2), len(rows) * (r + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for y, (label, imgs) in enumerate(rows):
        draw.text((4, y * (r + 2) + r // 2 - 6), label, fill="black")
        for x, img in enumerate(imgs):
            arr = img.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr, "RGB").resize((r, r), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + x * (r + 2), y * (r + 2)))
    import io

    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


# Frequent English words: an identifier among them carries a strong prior of its own.
_COMMON = set(["a", "an", "the", "of", "and", "or", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is", "are", "was", "be", "this", "that", "it", "its", "my", "your", "his", "her", "their", "our", "dog", "cat", "man", "woman", "person", "photo", "picture", "image", "style", "art", "car", "house", "tree", "red", "blue", "green", "black", "white", "new", "old", "big", "small", "good", "best", "top", "one", "two", "three", "sun", "sky", "sea", "beach", "city", "street"])


def identifier_warning(tokenizer: Any, instance_prompt: str, class_prompt: str | None) -> str | None:
    """A warning when the instance prompt's identifier (its words absent from the class prompt) is not
    a rare token: several tokens, a common word, or (full CLIP-size vocabularies, whose ids follow
    BPE merge order, i.e. frequency) a token among the most frequent half. None when it looks rare."""
    words = re.findall(r"[\w'-]+", instance_prompt.lower())
    cls = set(re.findall(r"[\w'-]+", (class_prompt or "").lower()))
    ident = [w for w in words if w not in cls] if class_prompt else []
    if class_prompt and not ident:
        return (f"instance prompt {instance_prompt!r} has no word that the class prompt {class_prompt!r} lacks: "
                "bind the subject to a rare identifier, e.g. 'a sks dog' with class prompt 'a dog'")
    problems = []
    for w in ident:
        ids = tokenizer(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            problems.append(f"{w!r} is {len(ids)} tokens")
        elif w in _COMMON:
            problems.append(f"{w!r} is a common word")
        elif len(tokenizer) >= 10_000 and ids[0] < len(tokenizer) // 2:
            problems.append(f"{w!r} is a frequent token (id {ids[0]} of {len(tokenizer)})")
    if not problems:
        return None
    return ("identifier " + "; ".join(problems) + ": DreamBooth binds the subject best to a rare single token "
            "(e.g. 'sks'), whose prior is weak")
