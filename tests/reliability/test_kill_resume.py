"""Fault harness, part 2: kill -9 and a full disk against real training processes, then --resume.

Every child runs tests/reliability/fault_child.py (deltatune.cli.main plus one injected fault) on
the tiny model with a checkpoint every step. Checked after each campaign: the final adapter is
bit-identical to an uninterrupted run's, metrics.jsonl holds each step exactly once with the
uninterrupted run's losses, every checkpoint left on disk loads, no temporary directory is left.

The random-kill campaigns need ~25 child processes (a few seconds each): ``slow``, like the
second kill-in-checkpoint and the adapter/merge disk-full cases. A kill between a checkpoint's
last file and its rename, and a full disk during a checkpoint, run by default (4 children).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

CHILD = Path(__file__).with_name("fault_child.py")
STEPS = 8


def _argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"model.spec={model_dir}", f"output_dir={out}", "data.num_train=16", "data.num_eval=2",
            "eval.before=false", "eval.exact_match=false", "train.batch_size=2", f"train.max_steps={STEPS}",
            "train.save_every=1", "lora.r=4", "lora.target_modules=[q_proj,v_proj]", *extra]
    return ["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]


def _env(fault: dict[str, Any] | None = None) -> dict[str, str]:
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", DELTATUNE_FAULT=json.dumps(fault or {}))
    return env


def _child(argv: list[str], fault: dict[str, Any] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(CHILD), *argv], env=_env(fault), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _run(argv: list[str], fault: dict[str, Any] | None = None, timeout: float = 600) -> tuple[int, str]:
    p = _child(argv, fault)
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode(errors="replace")


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _steps_and_losses(out: Path) -> list[tuple[int, float]]:
    def strict(x: str) -> None:
        raise AssertionError(f"bare {x} in metrics.jsonl")

    rows = [json.loads(line, parse_constant=strict) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows]


def _check_checkpoints(out: Path) -> int:
    root = out / "checkpoints"
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "temporary checkpoint dirs left behind"
    found = sorted(root.glob("step-*"))
    for ck in found:
        for f in ("trainable.safetensors", "optimizer.safetensors"):
            for t in load_file(str(ck / f)).values():
                assert not t.is_floating_point() or bool(torch.isfinite(t).all()), ck
        json.loads((ck / "state.json").read_text())
    return len(found)


def _same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("ref") / "run"
    code, err = _run(_argv(model_dir, out))
    assert code == 0, err[-3000:]
    return out, _adapter(out)


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return -1
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def _campaign(model_dir: Path, out: Path, kills: int, rng: random.Random) -> int:
    """Start, kill -9 at a random step (or during startup), resume, … ``kills`` times; then finish."""
    delivered, resume = 0, False
    for _ in range(kills * 3):
        p = _child(_argv(model_dir, out) + (["--resume"] if resume else []))
        if delivered < kills:
            target = rng.randint(0, STEPS)
            deadline = time.monotonic() + 120
            if target == 0:
                time.sleep(rng.uniform(0.2, 4.0))  # startup: imports, model load, run dir creation
            while p.poll() is None and _last_step(out / "metrics.jsonl") < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.08))  # somewhere inside the step or its checkpoint
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
                delivered += 1
                resume = True
                continue
        code = p.wait(timeout=600)
        assert code == 0, p.stderr.read().decode()[-3000:] if p.stderr else code
        if delivered >= kills:
            return delivered
        resume = True  # it finished before the kill: resume the finished run once more, and go on
    raise AssertionError("campaign did not finish")


def _check_final(out: Path, reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ref_out, ref_adapter = reference
    _same_adapter(_adapter(out), ref_adapter)
    steps = _steps_and_losses(out)
    assert [s for s, _ in steps] == list(range(1, STEPS + 1)), f"repeated or missing steps: {[s for s, _ in steps]}"
    assert steps == _steps_and_losses(ref_out), "losses differ from the uninterrupted run"
    assert _check_checkpoints(out) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == steps[-1][1]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_random_points_then_resume(seed: int, model_dir: Path, tmp_path: Path,
                                             reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """7 kills per seed (21 in all), at random steps, inside checkpoint writes and during startup."""
    out = tmp_path / "run"
    delivered = _campaign(model_dir, out, 7, random.Random(seed))
    assert delivered == 7
    _check_final(out, reference)


@pytest.mark.parametrize("where", [pytest.param("after_file", marks=pytest.mark.slow), "before_rename"])
def test_kill_9_while_a_checkpoint_is_written(where: str, model_dir: Path, tmp_path: Path,
                                              reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    out = tmp_path / "run"
    code, _ = _run(_argv(model_dir, out), {"kill_in_checkpoint": [3, where]})
    assert code == -signal.SIGKILL
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    code, err = _run(_argv(model_dir, out) + ["--resume"])
    assert code == 0, err[-3000:]
    _check_final(out, reference)


def _tree(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for r in roots for p in sorted(r.rglob("*"))
            if p.is_file()}


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(model_dir: Path, tmp_path: Path,
                                                              reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    out = tmp_path / "run"
    inputs = _tree(model_dir)
    code, err = _run(_argv(model_dir, out), {"fsize_before_checkpoint": [4, 3000]})
    assert code == 2, err[-3000:]
    assert f"{out / 'checkpoints' / 'step-000004'}: writing the checkpoint failed: " in err
    assert "File too large" in err
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert _tree(model_dir) == inputs
    assert (out / "error.txt").is_file()
    code, err = _run(_argv(model_dir, out) + ["--resume"])  # the disk has room again
    assert code == 0, err[-3000:]
    _check_final(out, reference)


@pytest.mark.slow
def test_disk_full_during_the_adapter_save(model_dir: Path, tmp_path: Path,
                                           reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    out = tmp_path / "run"
    code, err = _run(_argv(model_dir, out), {"fsize_before_adapter": 3000})
    assert code == 2, err[-3000:]
    assert f"{out / 'adapter'}: writing failed: File too large" in err
    assert not (out / "adapter").exists() and not [p for p in out.iterdir() if p.name.startswith(".adapter")]
    assert _check_checkpoints(out) == 2
    code, err = _run(_argv(model_dir, out) + ["--resume"])
    assert code == 0, err[-3000:]
    _check_final(out, reference)


@pytest.mark.slow
def test_disk_full_during_merge(model_dir: Path, tmp_path: Path,
                                reference: tuple[Path, dict[str, torch.Tensor]]) -> None:
    ref_out, _ = reference
    merged = tmp_path / "merged"
    inputs = _tree(model_dir, ref_out / "adapter")
    code, err = _run(["merge", "--model", str(model_dir), "--adapter", str(ref_out / "adapter"), "--out", str(merged)],
                     {"fsize_at_start": 50_000})
    assert code == 2, err[-3000:]
    assert f"{merged}: writing failed: " in err and "File too large" in err
    assert not merged.exists() and not list(tmp_path.glob(".merged*")), "a half-written merge is left"
    assert _tree(model_dir, ref_out / "adapter") == inputs
    code, err = _run(["merge", "--model", str(model_dir), "--adapter", str(ref_out / "adapter"), "--out", str(merged)])
    assert code == 0, err[-3000:]
    assert (merged / "model.safetensors").is_file()
    assert oct((merged / "model.safetensors").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old
