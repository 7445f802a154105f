"""The class-image cache: reused when the manifest matches, regenerated when any request field or the
base model changes, topped up (with the images a fresh run would make) when the count grows."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deltatune.diffusion import class_images, load_image_dir
from deltatune.diffusion.data import MANIFEST


class FakeSampler:
    """Deterministic per-seed images; counts the seeds it was asked for."""

    def __init__(self) -> None:
        self.seeds: list[int] = []

    def __call__(self, prompt: str, seeds: list[int]) -> torch.Tensor:
        self.seeds += list(seeds)
        return torch.stack([torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _req(**kw):
    base = dict(class_prompt="a bag", count=3, seed=7, resolution=4, steps=5, guidance_scale=3.0,
                scheduler={"class": "DDIMScheduler", "beta_end": 0.012}, base_fingerprint="abc", progress=False)
    base.update(kw)
    return base


def test_reused_invalidated_topped_up(tmp_path: Path) -> None:
    d = tmp_path / "cls"
    gen = FakeSampler()
    first = class_images(d, generate=gen, **_req())
    assert [p.name for p in first] == ["00000.png", "00001.png", "00002.png"] and len(gen.seeds) == 3
    m = json.loads((d / MANIFEST).read_text())
    assert m["count"] == 3 and m["class_prompt"] == "a bag" and m["base_fingerprint"] == "abc"

    # Same request: reused, nothing generated; a smaller count takes the first images.
    assert class_images(d, generate=gen, **_req()) == first and len(gen.seeds) == 3
    assert class_images(d, generate=gen, **_req(count=2)) == first[:2] and len(gen.seeds) == 3

    # Larger count: only the new images, and they equal a fresh run's.
    gen.seeds.clear()
    grown = class_images(d, generate=gen, batch_size=2, **_req(count=5))
    assert len(grown) == 5 and gen.seeds == [7 * 1_000_003 + 3, 7 * 1_000_003 + 4]
    fresh = class_images(tmp_path / "fresh", generate=FakeSampler(), **_req(count=5))
    for a, b in zip(load_image_dir(d), load_image_dir(tmp_path / "fresh")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(fresh) == 5

    # Any changed request field or another base model: regenerated from scratch.
    for change in ({"class_prompt": "a dog"}, {"seed": 8}, {"steps": 6}, {"resolution": 8},
                   {"base_fingerprint": "def"}, {"scheduler": {"class": "DDPMScheduler"}}, {"guidance_scale": 1.0}):
        gen.seeds.clear()
        out = class_images(d, generate=gen, **_req(**change))
        assert len(gen.seeds) == 3 and len(out) == 3, change
        assert json.loads((d / MANIFEST).read_text())["count"] == 3
        assert sorted(p.name for p in d.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
        class_images(d, generate=gen, **_req())  # back to the original request (regenerates again)

    # A deleted image: regenerated from the first gap on.
    (d / "00001.png").unlink()
    gen.seeds.clear()
    class_images(d, generate=gen, **_req())
    assert gen.seeds == [7 * 1_000_003 + 1, 7 * 1_000_003 + 2]


def test_real_sampler_top_up_equals_fresh(tiny_model, tmp_path: Path) -> None:
    """With the frozen tiny pipeline: 2 images then 4 == 4 at once (per-image generators)."""
    def generate(prompt, seeds):
        return tiny_model.sample([prompt] * len(seeds), seeds, steps=2)

    req = _req(base_fingerprint=tiny_model.base_fingerprint, resolution=tiny_model.resolution)
    class_images(tmp_path / "a", generate=generate, **{**req, "count": 2})
    class_images(tmp_path / "a", generate=generate, batch_size=2, **{**req, "count": 4})
    class_images(tmp_path / "b", generate=generate, batch_size=4, **{**req, "count": 4})
    for a, b in zip(load_image_dir(tmp_path / "a"), load_image_dir(tmp_path / "b")):
        assert (a - b).abs().max() <= 1 / 255 + 1e-6  # 8-bit PNGs; batch size may change one rounding
