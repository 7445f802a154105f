"""Replay mixing: a fixed number of replay rows in every batch, deterministic, resume-safe through run()."""

from __future__ import annotations

import json
from pathlib import Path

from deltatune.config import load_config
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run
from deltatune.train.replay import replay_batches


def test_every_batch_mixes_k_replay_rows_deterministically():
    n_t, n_r, bs, ratio = 10, 7, 4, 0.25
    plans = [replay_batches(n_t, n_r, bs, ratio, seed=3, epoch=e) for e in range(3)]
    assert plans[0] == replay_batches(n_t, n_r, bs, ratio, seed=3, epoch=0)
    assert plans[0] != replay_batches(n_t, n_r, bs, ratio, seed=4, epoch=0)
    for plan in plans:
        assert sorted(i for b in plan for i in b if i < n_t) == list(range(n_t))  # each target row once per epoch
        assert all(sum(i >= n_t for i in b) == 1 for b in plan)  # k = round(4 * 0.25) = 1
    # The replay stream continues across epochs and covers every replay row once per cycle.
    stream = [i - n_t for plan in plans for b in plan for i in b if i >= n_t]
    assert len(stream) == 12 and sorted(stream[:n_r]) == list(range(n_r)) and len(set(stream[n_r:])) == 12 - n_r


def _losses(d: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_replay_run_resume_equals_uninterrupted(model_dir: Path, tmp_path: Path):
    rep = tmp_path / "replay.jsonl"
    rep.write_text("\n".join(json.dumps({"text": f"General sentence number {i} about the sea."}) for i in range(5)))

    def cfg(out: Path, *extra: str) -> TrainConfig:
        return load_config(TrainConfig, None, [
            f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=12", "data.num_eval=2",
            "train.batch_size=4", "train.epochs=2", "train.lr=5e-3", f"output_dir={out}", "eval.exact_match=false",
            "train.bf16=false", "forgetting.enabled=false", f"data.replay_file={rep}", "data.replay_ratio=0.5", *extra])

    a = run(cfg(tmp_path / "a"), progress=False)
    assert a.summary["data"]["replay"] == {"file": str(rep), "rows": 5, "ratio": 0.5, "per_batch": 2,
                                           "target_rows": 12}
    assert a.summary["steps"] == 12  # 12 target rows / (4 − 2) per batch × 2 epochs
    assert run(cfg(tmp_path / "b"), progress=False, stop_after_steps=7).interrupted  # mid-epoch 2
    run(cfg(tmp_path / "b", "resume=true"), progress=False)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    plain = run(cfg(tmp_path / "c", "data.replay_ratio=0", "data.replay_file=null"), progress=False)
    assert plain.summary["steps"] == 6 and "replay" not in plain.summary["data"]
