"""``deltatune dreambooth`` through the one training loop on a tiny pipeline: files, grids, resume ≡
uninterrupted, prior rows in every batch, and the loss unit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.config import load_config
from deltatune.diffusion.command import overrides_from_args
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run


def _args(pipe: Path, inst: Path, cls: Path, out: Path, *extra: str) -> list[str]:
    return ["dreambooth", "--no-progress", "--model", str(pipe), "--instance-dir", str(inst),
            "--instance-prompt", "a photo of a sks bag", "--class-prompt", "a photo of a bag",
            "--with-prior-preservation", "--num-class-images", "3", "--class-dir", str(cls), "--max-steps", "4",
            "--batch-size", "2", "--out", str(out), "--rank", "2",
            "--set", "dreambooth.sample_steps=2", "--set", "dreambooth.num_validation_images=2",
            "--set", "dreambooth.eval_images=2", *extra]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dreambooth_cli_resume_equals_uninterrupted(tiny_pipeline_dir: Path, tmp_path: Path, write_images) -> None:
    write_images(tmp_path / "inst", 3, seed=5)
    full = tmp_path / "full"
    assert main(_args(tiny_pipeline_dir, tmp_path / "inst", tmp_path / "cls", full)) == 0
    assert (full / "pytorch_lora_weights.safetensors").exists() and (full / "grid.png").stat().st_size > 200
    assert len(list((full / "validation_after").glob("*.png"))) == 6  # 3 prompts × 2 seeds
    summary = json.loads((full / "summary.json").read_text())
    assert summary["objective"] == "dreambooth" and summary["data"]["class_images"] == 3
    assert {"eval_instance_loss", "eval_prior_loss"} <= summary["after"].keys()
    keys = load_file(str(full / "pytorch_lora_weights.safetensors"))
    assert keys and all(k.startswith("unet.") for k in keys)

    part = tmp_path / "part"
    import argparse

    from deltatune.cli import build_parser

    ns: argparse.Namespace = build_parser().parse_args(_args(tiny_pipeline_dir, tmp_path / "inst", tmp_path / "cls", part))
    cfg = load_config(TrainConfig, None, overrides_from_args(ns) + ns.overrides)
    assert run(cfg, progress=False, stop_after_steps=2).interrupted
    assert main(_args(tiny_pipeline_dir, tmp_path / "inst", tmp_path / "cls", part, "--resume")) == 0
    assert _losses(part) == _losses(full) and len(_losses(full)) == 4
    a, b = load_file(str(part / "pytorch_lora_weights.safetensors")), keys
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow  # ~25 s on the shared CPU; test_adapters covers the same pieces below the loop
def test_dreambooth_full_and_text_encoder(tiny_pipeline_dir: Path, tmp_path: Path, write_images) -> None:
    """Full fine-tuning trains the UNet only; a run with the text encoder adapts it too (LoRA file
    keys under text_encoder.)."""
    write_images(tmp_path / "inst", 2, seed=6)
    out = tmp_path / "full"
    assert main(_args(tiny_pipeline_dir, tmp_path / "inst", tmp_path / "cls", out, "--method", "full",
                      "--lr", "1e-3", "--max-steps", "2")) == 0
    from deltatune.diffusion import load_pipeline

    trained, base = load_pipeline(out / "pipeline"), load_pipeline(tiny_pipeline_dir)
    changed = lambda m1, m2: any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))  # noqa: E731
    assert changed(trained.unet, base.unet)
    assert not changed(trained.text_encoder, base.text_encoder)
    assert not changed(trained.vae, base.vae)

    te = tmp_path / "te"
    assert main(_args(tiny_pipeline_dir, tmp_path / "inst", tmp_path / "cls", te, "--train-text-encoder",
                      "--max-steps", "2", "--set", "dreambooth.num_validation_images=0")) == 0
    keys = load_file(str(te / "pytorch_lora_weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in keys)


def test_dreambooth_refuses_bad_setups(tiny_pipeline_dir: Path, tmp_path: Path, write_images) -> None:
    write_images(tmp_path / "inst", 1, seed=7)
    cfg = load_config(TrainConfig, None, ["objective=dreambooth", f"model.spec={tiny_pipeline_dir}",
                                          f"dreambooth.instance_dir={tmp_path / 'inst'}",
                                          "dreambooth.instance_prompt=a sks bag", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ValueError, match="language-model default"):
        run(cfg, progress=False)
    with pytest.raises(ValueError, match="'lora' or 'full'"):
        run(load_config(TrainConfig, None, ["objective=dreambooth", "method=vera", f"model.spec={tiny_pipeline_dir}",
                                            f"output_dir={tmp_path / 'o'}"]), progress=False)
