"""The real default end to end (slow: ~5 minutes on 2 cores): SmolLM2-135M-Instruct learns the
built-in JSON-extraction task with the built-in settings, exactly what `make demo` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.cli import main


@pytest.mark.slow
def test_default_demo_learns_the_task(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    out = tmp_path / "demo"
    assert main(["train", "--no-progress", "--set", f"output_dir={out}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["before"]["exact_match"] <= 0.1  # the base model does not produce the format
    assert summary["after"]["exact_match"] >= 0.8  # one epoch of LoRA does
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "loss.png").exists()
