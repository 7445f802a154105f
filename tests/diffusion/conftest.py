"""Tiny random Stable Diffusion-layout pipelines built from configs (no downloads, ~1 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from deltatune.diffusion import DiffusionModel, load_pipeline  # noqa: E402
from deltatune.diffusion.data import save_png  # noqa: E402
from deltatune.diffusion.miniature import TINY_SPEC, build_components, save_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-sd")
    parts = build_components(TINY_SPEC, root / "tok", seed=0)
    return save_pipeline(parts, root / "pipe")


@pytest.fixture
def tiny_model(tiny_pipeline_dir: Path) -> DiffusionModel:
    return load_pipeline(tiny_pipeline_dir)


def _write_images(folder: Path, n: int, seed: int, size: int = 8) -> list[torch.Tensor]:
    """n random RGB images (3, size, size) in [0, 1] saved as PNGs; returns them as written (8-bit)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = (torch.rand(3, size, size, generator=g) * 255).round() / 255
        save_png(folder / f"{i:02d}.png", img)
        out.append(img)
    return out


@pytest.fixture
def write_images():  # type: ignore[no-untyped-def]
    return _write_images
