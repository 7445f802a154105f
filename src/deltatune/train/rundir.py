"""Run-directory identity: a run directory belongs to one configuration.

``claim(cfg, out_dir)`` runs before a run writes anything:

- a fresh run (no ``--resume``) in a directory that already holds a run (its ``config.json``,
  checkpoints, metrics, adapter …) is refused, unless ``overwrite`` asks for a fresh start, which
  deletes that run's files (and only those). Without this, a reused ``output_dir`` mixed two
  runs: the keep-2 checkpoint rotation deleted the new run's checkpoints (the old step-30 ones
  sort after them) and a later ``--resume`` continued the *old* run.
- ``--resume`` compares the stored ``config.json`` with the new config key by key and refuses any
  change outside :data:`SAFE_TO_CHANGE` (run length, evaluation and logging), naming each changed
  key with both values; a changed lr, seed, data file or rank would otherwise be accepted
  silently (or end in a shape error deep in the checkpoint loader).

``truncate_metrics`` cuts ``metrics.jsonl`` back to the checkpoint's step on resume, so the steps
between the checkpoint and a kill are not logged (and plotted) twice.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..config import to_dict
from ..io import atomic_write_bytes

__all__ = ["SAFE_TO_CHANGE", "RUN_FILES", "RunDirError", "claim", "config_changes", "truncate_metrics",
           "last_logged_loss", "holds_run"]

# Keys a resumed run may change: how long it runs, how it evaluates and logs, where it runs. A
# longer max_steps stretches the lr schedule from the resumed step on (documented, not silent).
SAFE_TO_CHANGE: tuple[str, ...] = ("train.max_steps", "train.epochs", "train.eval_every", "train.log_every",
                                   "train.save_every", "eval.", "resume", "overwrite", "output_dir", "model.device")

# What a run writes into its directory; `overwrite` deletes exactly these.
RUN_FILES: tuple[str, ...] = ("config.json", "checkpoints", "metrics.jsonl", "summary.json", "before.json",
                              "adapter", "model", "predictions_before.jsonl", "predictions_after.jsonl",
                              "loss.png", "error.txt")


class RunDirError(ValueError):
    """The output directory belongs to another run, or ``--resume`` changes what must not change."""


def _flatten(d: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    # TrainConfig is sections of leaves: flatten one level (a dict-valued leaf such as
    # lora.rank_pattern stays one value).
    for k, v in d.items():
        if isinstance(v, Mapping):
            for k2, v2 in v.items():
                yield f"{k}.{k2}", v2
        else:
            yield str(k), v


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs. Keys the stored config does
    not have (it predates them) are not changes."""
    a, b = dict(_flatten(old)), dict(_flatten(new))
    return [(k, a[k], b.get(k)) for k in sorted(a) if k in b and _norm(a[k]) != _norm(b[k])]


def _norm(v: Any) -> Any:
    return json.loads(json.dumps(v))  # tuples → lists, as config.json stores them


def holds_run(out_dir: Path) -> list[str]:
    """The run files present in ``out_dir`` (empty: not a run directory)."""
    return [name for name in RUN_FILES if (out_dir / name).exists()] if out_dir.is_dir() else []


def claim(cfg: Any, out_dir: Path) -> None:
    """Check ``out_dir`` against ``cfg`` before anything is written (see the module docstring).
    Raises :class:`RunDirError`; with ``cfg.overwrite`` deletes the previous run's files."""
    found = holds_run(out_dir)
    if cfg.resume:
        stored_path = out_dir / "config.json"
        if not stored_path.is_file():
            return  # nothing to compare with (the loop warns that it starts from scratch)
        try:
            stored = json.loads(stored_path.read_text())
        except (OSError, ValueError) as e:
            raise RunDirError(f"{stored_path}: cannot be read ({e}); the run cannot be checked for --resume") from e
        changes = [(k, o, n) for k, o, n in config_changes(stored, to_dict(cfg)) if not _safe(k)]
        if changes:
            listed = "; ".join(f"{k}: {o!r} → {n!r}" for k, o, n in changes)
            raise RunDirError(
                f"{out_dir}: --resume with a changed config: {listed}. A resumed run must train what it "
                f"started with; only {', '.join(SAFE_TO_CHANGE)} may change. Undo the change, or start a "
                "new run (another output_dir, or --overwrite to replace this one)")
        _remove_partial_checkpoints(out_dir)
        return
    if not found:
        return
    if not getattr(cfg, "overwrite", False):
        raise RunDirError(
            f"{out_dir}: already holds a run ({', '.join(found)}); continue it with --resume, replace it with "
            "--overwrite (deletes those files), or choose another output_dir")
    for name in found:
        p = out_dir / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _remove_partial_checkpoints(out_dir: Path) -> None:
    """Temporary directories of checkpoints a kill interrupted (never renamed into place)."""
    for tmp in (out_dir / "checkpoints").glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill in mid-write
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the records of steps 1..``step`` (the checkpoint resumed from; 0 = none)."""
    if not path.exists():
        return
    if step <= 0:
        path.unlink()
        return
    kept = [r for r in _records(path) if r["step"] <= step]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def last_logged_loss(path: Path) -> float | None:
    """The loss of the last step in ``metrics.jsonl``: a resumed run that had nothing left to train
    reports its final loss from here (it reported null)."""
    if not path.exists():
        return None
    recs = _records(path)
    loss = recs[-1].get("loss") if recs else None
    return float(loss) if isinstance(loss, int | float) else None
