"""Classification metrics: accuracy, macro-F1, the confusion matrix (JSON and PNG).

Macro-F1 is the unweighted mean over the labels of F1 = 2·P·R/(P + R) per label, with
P = TP/(TP + FP) and R = TP/(TP + FN) taken as 0 when their denominator is 0 (scikit-learn's
``zero_division=0``); every label of the training data counts, including one the evaluation
data never contains. The confusion matrix has gold labels as rows, predictions as columns.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes

__all__ = ["classification_metrics", "plot_confusion"]


def classification_metrics(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict[str, Any]:
    """``accuracy``, ``macro_f1``, per-label ``f1``, ``confusion`` (K×K, rows = gold) and ``labels``."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    f1 = {}
    for i, name in enumerate(labels):
        tp = confusion[i][i]
        predicted = sum(confusion[r][i] for r in range(k))
        actual = sum(confusion[i])
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1[name] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(gold)
    return {
        "accuracy": sum(confusion[i][i] for i in range(k)) / n if n else 0.0,
        "macro_f1": sum(f1.values()) / k if k else 0.0,
        "eval_examples": n,
        "f1": f1,
        "labels": list(labels),
        "confusion": confusion,
    }


def plot_confusion(metrics: dict[str, Any], out_png: str | Path, *, title: str = "") -> Path:
    """Draw ``metrics['confusion']`` as a heat map with counts (rows: gold, columns: predicted)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    confusion, labels = metrics["confusion"], metrics["labels"]
    k = len(labels)
    size = max(4.0, 0.55 * k + 2.5)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    top = max((max(row) for row in confusion), default=0)
    for r in range(k):
        for c in range(k):
            if confusion[r][c]:
                ax.text(c, r, str(confusion[r][c]), ha="center", va="center", fontsize=7,
                        color="white" if confusion[r][c] > top / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title or f"accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out_png, buf.getvalue())
    return Path(out_png)
