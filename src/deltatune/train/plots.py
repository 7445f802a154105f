"""Loss curves from a run's ``metrics.jsonl`` (one JSON object per optimizer step).

Records carry ``step`` and ``loss`` (train loss of that step) and, on evaluation steps,
``eval_loss``. A resumed run appends records for steps it repeats; the last record for a step wins.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes

SMOOTHING = 0.9  # EMA weight of the smoothed train curve, as TensorBoard's slider default-ish


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file sorted by step, one per step (later lines override earlier).

    Blank and unparsable lines (a run killed mid-write leaves half a line) are skipped.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int | float):
            by_step[int(rec["step"])] = rec
    return [by_step[s] for s in sorted(by_step)]


def ema(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction, so the first points aren't pulled toward 0."""
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(int(r["step"]), float(r[key])) for r in records if isinstance(r.get(key), int | float)]
    pts = [(s, v) for s, v in pts if math.isfinite(v)]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_losses(metrics_jsonl_path: str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """Draw train loss (raw and EMA-smoothed) and eval loss against step into ``out_png``.

    The PNG is rendered in memory and written atomically (temp file + rename), so a viewer never
    sees a half-written image. Returns the output path. Raises ValueError if there is nothing to plot.
    """
    # Agg without touching the global backend (pyplot.switch_backend would affect the caller).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_jsonl_path)
    steps, loss = _series(records, "loss")
    eval_steps, eval_loss = _series(records, "eval_loss")
    if not steps and not eval_steps:
        raise ValueError(f"{metrics_jsonl_path}: no 'loss' or 'eval_loss' records to plot")

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if steps:
        ax.plot(steps, loss, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, ema(loss), color="tab:blue", linewidth=2, label=f"train loss (EMA {SMOOTHING})")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, color="tab:orange", marker="o", linewidth=2, label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean per token)")
    ax.set_title(title or Path(metrics_jsonl_path).parent.name or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out_png)
    atomic_write_bytes(out, buf.getvalue())
    return out


__all__ = ["ema", "plot_losses", "read_metrics"]
