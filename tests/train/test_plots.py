"""Loss plot: a valid PNG from a synthetic metrics file; resumed-run duplicates and torn lines."""

from __future__ import annotations

import json
import os

import pytest

from deltatune.train.plots import ema, plot_losses, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(path, n=30, eval_every=10):
    lines = []
    for step in range(1, n + 1):
        rec = {"step": step, "loss": 3.0 / step**0.5, "lr": 1e-4}
        if step % eval_every == 0:
            rec["eval_loss"] = 2.5 / step**0.3
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")


def test_plot_losses_writes_png_atomically(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    _write_metrics(metrics)
    out = plot_losses(metrics, tmp_path / "plots" / "loss.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
    assert width > 300 and height > 200
    assert os.listdir(out.parent) == ["loss.png"]  # no temp file left behind


def test_read_metrics_last_record_per_step_wins_and_torn_lines_skipped(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(
        '{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n'
        '{"step": 2, "loss": 3.5, "eval_loss": 3.9}\n\n{"step": 3, "lo'  # resumed at 2, killed mid-line
    )
    recs = read_metrics(metrics)
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[1] == {"step": 2, "loss": 3.5, "eval_loss": 3.9}
    assert plot_losses(metrics, tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_losses_rejects_empty(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no 'loss'"):
        plot_losses(metrics, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_ema_is_bias_corrected():
    assert ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])
    w = 0.9
    naive = [1.0, (w * 0.1 * 1.0 + 0.1 * 3.0) / (1 - w**2)]
    assert ema([1.0, 3.0], w) == pytest.approx(naive)
