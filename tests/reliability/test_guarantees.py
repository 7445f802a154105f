"""What the README's Reliability section promises, each checked once: run-directory identity,
--resume config check, metrics without repeated steps, final_loss on a resumed finished run,
umask-following modes, strict JSON, the atomic-directory writer and the input rule."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from deltatune.cli import main
from deltatune.fsutil import OutputExistsError, atomic_dir, dumps_json, refuse_input
from deltatune.train.rundir import config_changes, last_logged_loss, truncate_metrics


def _args(model_dir: Path, out: Path, *sets: str) -> list[str]:
    base = [f"model.spec={model_dir}", f"output_dir={out}", "data.num_train=8", "data.num_eval=2",
            "eval.before=false", "eval.max_new_tokens=2", "train.batch_size=2", "train.max_steps=4",
            "train.save_every=1", "lora.r=4", "lora.target_modules=[q_proj,v_proj]", *sets]
    return ["train", "--no-progress", *[a for s in base for a in ("--set", s)]]


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def test_run_dir_identity_resume_check_metrics_and_modes(model_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(_args(model_dir, out, "train.max_steps=2")) == 0
    finally:
        os.umask(old)
    # every output follows the umask (mkstemp/mkdtemp made them 0600/0700)
    for rel, mode in _modes(out).items():
        want = 0o755 if (out / rel).is_dir() else 0o644
        assert mode == want, f"{rel}: {oct(mode)}"
    summary = json.loads((out / "summary.json").read_text())
    capsys.readouterr()

    # a fresh run into the used directory is refused, and changes nothing
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main(_args(model_dir, out, "train.max_steps=2", "train.seed=5")) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    # --resume with an unsafe change names it; a safe one (more steps) continues
    assert main(_args(model_dir, out, "train.max_steps=2", "train.lr=0.01", "lora.r=8") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.0005 → 0.01" in err and "lora.r: 4 → 8" in err
    # resuming the finished run keeps its final loss (it wrote null)
    assert main(_args(model_dir, out, "train.max_steps=2") + ["--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    assert main(_args(model_dir, out, "train.max_steps=4") + ["--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # --overwrite starts afresh, deleting the run's files and nothing else
    (out / "notes.txt").write_text("mine")
    assert main(_args(model_dir, out, "train.max_steps=1") + ["--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]


def test_truncate_metrics_and_last_loss(tmp_path: Path) -> None:
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    truncate_metrics(m, 4)
    assert [json.loads(x)["step"] for x in m.read_text().splitlines()] == [1, 2, 3, 4]
    assert last_logged_loss(m) == 0.4
    truncate_metrics(m, 0)
    assert not m.exists() and last_logged_loss(m) is None


def test_config_changes_names_each_key() -> None:
    old = {"train": {"lr": 1e-3, "max_steps": 5, "betas": [0.9, 0.99]}, "lora": {"rank_pattern": {"q": 2}}, "x": 1}
    new = {"train": {"lr": 2e-3, "max_steps": 9, "betas": (0.9, 0.99)}, "lora": {"rank_pattern": {"q": 3}}, "x": 1,
           "added_later": 3}
    assert config_changes(old, new) == [("lora.rank_pattern", {"q": 2}, {"q": 3}), ("train.lr", 1e-3, 2e-3),
                                        ("train.max_steps", 5, 9)]


def test_dumps_json_never_writes_bare_nan() -> None:
    text = dumps_json({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.5], "c": {"d": None}}


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final, replaceable=lambda p: True) as d:
        (d / "a").write_text("2")
        raise RuntimeError("half-way")
    assert (final / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError, match="holds other files"), atomic_dir(final):
        pass
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"), atomic_dir(tmp_path / "f"):
        pass


def test_refuse_input(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "sub", tmp_path):
        with pytest.raises(OutputExistsError, match="input"):
            refuse_input(out, [("base model", model)])
    refuse_input(tmp_path / "other", [("base model", model), ("adapter", None)])


def test_a_truncated_checkpoint_on_resume_says_what_to_do(model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_args(model_dir, out, "train.max_steps=2")) == 0
    latest = out / "checkpoints" / "step-000002" / "trainable.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    capsys.readouterr()
    assert main(_args(model_dir, out, "train.max_steps=3") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert f"{latest.parent}: checkpoint cannot be read" in err and "delete it to resume from the one before" in err


def test_dropped_records_are_counted_and_named(model_dir: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"Say {i}", "output": f"ok {i}"} for i in range(6)]
    rows.insert(3, {"instruction": "word " * 80, "output": "lost"})  # its answer starts after max_length
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="deltatune"):
        assert main(_args(model_dir, out, f"data.train_file={data}", "data.max_length=64", "train.max_steps=1",
                          "eval.exact_match=false")) == 0
    text = caplog.text
    assert "1 dropped" in text and f"{data}:4" in text and "data.max_length=64" in text
    info = json.loads((out / "summary.json").read_text())["data"]
    assert info["dropped_records"] == 1 and info["dropped_sources"] == [f"{data}:4"]
