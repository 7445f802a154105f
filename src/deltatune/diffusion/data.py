"""DreamBooth data: instance images from a folder, augmentations as the reference scripts do them,
the class (prior) images generated once by the frozen model and cached with a manifest, and the
pairing of instance and prior rows into one batch.

Class-image cache (``class_dir/manifest.json``): the images are reused only when the manifest's
class prompt, seed, resolution, scheduler, step count, guidance and base-model fingerprint all match
the request; a larger count tops the folder up. Image ``i`` is sampled from its own generator seeded
``seed·1_000_003 + i``, so a topped-up folder holds the images a fresh run of the larger count
would generate.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..io import atomic_write_bytes

log = logging.getLogger("deltatune.diffusion")

__all__ = ["IMAGE_SUFFIXES", "Augment", "load_image", "load_image_dir", "augment", "class_images",
           "read_manifest", "pair_rows", "save_png", "MANIFEST"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1


def load_image(path: Path) -> torch.Tensor:
    """RGB float (3, H, W) in [0, 1] (grayscale and RGBA are converted, as ``convert('RGB')``)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_image_dir(folder: str | Path, what: str = "instance") -> list[torch.Tensor]:
    """Every image in ``folder`` (sorted by name), as (3, H, W) floats in [0, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--{what}-dir {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--{what}-dir {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return [load_image(p) for p in files]


def save_png(path: Path, image: torch.Tensor) -> None:
    """(3, H, W) in [0, 1] → an 8-bit RGB PNG, written atomically."""
    from PIL import Image

    arr = (image.clamp(0, 1).permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy())
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@dataclass(frozen=True)
class Augment:
    """The reference scripts' transforms: resize the short side to ``resolution`` (bilinear,
    antialiased), crop a square (centre or random), optional horizontal flip, scale to [-1, 1]."""

    resolution: int
    center_crop: bool = True
    random_flip: bool = False

    @property
    def deterministic(self) -> bool:
        return self.center_crop and not self.random_flip


def augment(image: torch.Tensor, aug: Augment, gen: torch.Generator | None = None) -> torch.Tensor:
    """(3, H, W) in [0, 1] → (3, R, R) in [-1, 1]. ``gen`` (default: torch's global generator, which
    the training loop's checkpoints restore) draws the crop offset and the flip."""
    _, h, w = image.shape
    r = aug.resolution
    scale = r / min(h, w)
    nh, nw = max(r, round(h * scale)), max(r, round(w * scale))
    x = image[None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    if aug.center_crop:
        top, left = (nh - r) // 2, (nw - r) // 2
    else:
        top = int(torch.randint(0, nh - r + 1, (1,), generator=gen))
        left = int(torch.randint(0, nw - r + 1, (1,), generator=gen))
    x = x[:, :, top:top + r, left:left + r]
    if aug.random_flip and bool(torch.rand((), generator=gen) < 0.5):
        x = x.flip(-1)
    return (x[0].clamp(0, 1) * 2 - 1).contiguous()


def pair_rows(n_instance: int, n_prior: int) -> list[tuple[int, int | None]]:
    """One epoch's (instance index, prior index) pairs: max(K, N) pairs cycling through both lists,
    as the reference scripts' dataset does (each pair becomes two rows of the same batch)."""
    if n_instance <= 0:
        raise ValueError("DreamBooth needs at least one instance image")
    n = max(n_instance, n_prior)
    return [(i % n_instance, (i % n_prior) if n_prior else None) for i in range(n)]


# ------------------------------------------------------------------------------------------ class images
def read_manifest(class_dir: Path) -> dict[str, Any] | None:
    path = class_dir / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupted class-image manifest ({e}); delete the folder to regenerate") from e
    return data if isinstance(data, dict) else None


def _request_key(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m.get(k) for k in ("version", "class_prompt", "seed", "resolution", "scheduler", "steps",
                                  "guidance_scale", "base_fingerprint")}


def class_images(class_dir: str | Path, *, class_prompt: str, count: int, seed: int, resolution: int,
                 steps: int, guidance_scale: float, scheduler: dict[str, Any], base_fingerprint: str,
                 generate: Callable[[str, Sequence[int]], torch.Tensor], batch_size: int = 16,
                 progress: bool = True) -> list[Path]:
    """The first ``count`` class images in ``class_dir``, generated with ``generate`` where needed.

    ``generate(prompt, seeds) -> (len(seeds), 3, R, R)`` in [0, 1], one image per seed (the frozen
    model's sampler). ``scheduler`` is the sampler's config (class name + settings) and
    ``base_fingerprint`` identifies the frozen model: a manifest that differs in any request field
    is stale, and its images are replaced."""
    from tqdm import tqdm

    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    want = {"version": _MANIFEST_VERSION, "class_prompt": class_prompt, "seed": seed, "resolution": resolution,
            "scheduler": scheduler, "steps": steps, "guidance_scale": guidance_scale,
            "base_fingerprint": base_fingerprint}
    old = read_manifest(class_dir)
    files: list[str] = []
    if old is not None and _request_key(old) == want:
        listed = list(old.get("images", []))
        for i, f in enumerate(listed):  # the intact prefix 00000.png, 00001.png, …
            if f != _name(i) or not (class_dir / f).exists():
                log.warning("%s: class image %s is missing; regenerating from there", class_dir, _name(i))
                break
            files.append(f)
    elif old is not None:
        changed = [k for k in want if _request_key(old).get(k) != want[k]]
        log.warning("%s: cached class images were made with a different %s; regenerating", class_dir, ", ".join(changed))
        for f in old.get("images", []):
            (class_dir / f).unlink(missing_ok=True)
    have = len(files)
    if have < count:
        log.info("generating %d class image(s) for %r in %s", count - have, class_prompt, class_dir)
        bar = tqdm(total=count - have, desc="class images", disable=not progress)
        for start in range(have, count, batch_size):
            idx = list(range(start, min(count, start + batch_size)))
            images = generate(class_prompt, [seed * 1_000_003 + i for i in idx])
            for i, img in zip(idx, images):
                save_png(class_dir / _name(i), img)
                files.append(_name(i))
            bar.update(len(idx))
            # The manifest follows the images written so far: an interrupted run resumes from here.
            _write_manifest(class_dir, want, files)
        bar.close()
    if old is None or have < count or _request_key(old) != want:
        _write_manifest(class_dir, want, files)
    return [class_dir / f for f in files[:count]]


def _name(i: int) -> str:
    return f"{i:05d}.png"


def _write_manifest(class_dir: Path, want: dict[str, Any], files: list[str]) -> None:
    data = dict(want, count=len(files), images=files)
    atomic_write_bytes(class_dir / MANIFEST, (json.dumps(data, indent=2) + "\n").encode())
