"""What a new user sees first: a run that fails leaves no debris, and no third-party import noise
precedes deltatune's own output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deltatune.cli import main


def test_a_run_failing_before_training_leaves_no_run_directory(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs" / "r1"
    rc = main(["train", "--no-progress", "--set", f"model.spec={tmp_path / 'no-such-model'}",
               "--set", f"output_dir={out}"])
    assert rc == 2
    assert "no-such-model" in capsys.readouterr().err
    assert not out.exists()


def test_a_failing_run_in_an_existing_directory_says_why(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"nonsense": 1}\n')
    rc = main(["train", "--no-progress", "--set", f"model.spec={model_dir}", "--set", f"output_dir={out}",
               "--set", f"data.train_file={bad_data}"])
    assert rc == 2
    assert (out / "notes.txt").read_text() == "mine"  # nothing of the user's is removed
    error = (out / "error.txt").read_text()
    assert "bad.jsonl" in error


def test_a_failed_run_then_a_good_one(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--no-progress", "--set", f"model.spec={tmp_path / 'missing'}",
                 "--set", f"output_dir={out}"]) == 2
    assert main(["train", "--no-progress", "--set", f"model.spec={model_dir}", "--set", f"output_dir={out}",
                 "--set", "train.max_steps=1", "--set", "data.num_train=4", "--set", "data.num_eval=1",
                 "--set", "eval.max_new_tokens=2"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    assert not (out / "error.txt").exists()


def test_first_screen_has_no_third_party_import_noise(model_dir: Path) -> None:
    pytest.importorskip("torchao")  # the noise comes from torchao being installed (the dev extras have it)
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "generate", "--model", str(model_dir),
                           "--prompt", "hi", "--max-new-tokens", "2"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for noise in ("torchao", "triton", "register_constant", "_pytree"):
        assert noise not in done.stderr, done.stderr
