"""Forgetting report and regularisers through run() on a tiny model: summary sections, resume ≡
uninterrupted with every hook, the Fisher saved in checkpoints and reused, online EWC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltatune.config import load_config
from deltatune.regularize.ewc import load_fisher
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run

REF = ("The quick brown fox jumps over the lazy dog.\n\nWhat is the capital of France? The capital of France "
       "is Paris.\n\nMaria Lopez, a 34-year-old nurse from Lisbon, volunteers at the local library.")


def _cfg(model_dir: Path, out: Path, ref: Path, *extra: str) -> TrainConfig:
    base = [f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=12", "data.num_eval=2",
            "train.batch_size=4", "train.lr=5e-3", f"output_dir={out}", "eval.exact_match=false",
            "train.bf16=false", "lora.r=4", f"forgetting.reference_file={ref}", "forgetting.max_length=16"]
    return load_config(TrainConfig, None, base + list(extra))


@pytest.fixture
def ref(tmp_path: Path) -> Path:
    p = tmp_path / "ref.txt"
    p.write_text(REF)
    return p


def _losses(d: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,extra", [
    ("lora", ["regularize.ewc.weight=50", "regularize.ewc.samples=3"]),
    ("lora", ["regularize.kl.weight=1", "regularize.l2sp.weight=1"]),
    ("full", ["regularize.ewc.weight=50", "regularize.ewc.samples=3", "regularize.ewc.estimator=sampled",
              "regularize.kl.weight=1"]),
])
def test_regularised_run_reports_and_resume_equals_uninterrupted(model_dir, tmp_path, ref, method, extra,
                                                                monkeypatch):
    common = [f"method={method}", "train.lr=1e-3" if method == "full" else "train.lr=5e-3", *extra]
    full = run(_cfg(model_dir, tmp_path / "a", ref, *common), progress=False)
    s = full.summary
    f = s["forgetting"]
    assert f["kl_base_to_adapted_mean"] > 0 and f["reference_tokens"] > 0
    assert f["kl_mode"].startswith("exact") == (method == "lora")
    assert set(s["regularize"]) == {k.split(".")[1] for k in extra if k.endswith(tuple("0123456789")) and
                                    ".weight=" in k}
    if "ewc" in s["regularize"]:
        assert s["regularize"]["ewc"]["samples"] == 3 and s["regularize"]["ewc"]["fisher_seconds"] >= 0
    assert (tmp_path / "a" / "forgetting.png").is_file()
    part = tmp_path / "b"
    assert run(_cfg(model_dir, part, ref, *common), progress=False, stop_after_steps=1).interrupted
    first_fisher = json.loads((part / "checkpoints" / "step-000001" / "state.json").read_text())
    import deltatune.regularize.ewc as ewc_mod

    def no_estimate(*a, **k):  # the checkpoint holds F and θ*: a resumed run must not estimate again
        raise AssertionError("Fisher re-estimated on resume")

    monkeypatch.setattr(ewc_mod, "fisher_diagonal", no_estimate)
    resumed = run(_cfg(model_dir, part, ref, *common, "resume=true"), progress=False).summary
    assert _losses(part) == _losses(tmp_path / "a")
    if "ewc" in s["regularize"]:
        assert resumed["regularize"]["ewc"]["fisher_seconds"] == first_fisher["hooks"]["ewc"]["fisher_seconds"]


def test_resuming_from_a_checkpoint_that_lost_its_ewc_state_is_refused(model_dir, tmp_path, ref):
    """(A changed config is refused earlier, by the run directory.) F = 0 would switch EWC off silently."""
    part, ewc = tmp_path / "r", ["regularize.ewc.weight=50", "regularize.ewc.samples=2"]
    assert run(_cfg(model_dir, part, ref, *ewc), progress=False, stop_after_steps=1).interrupted
    state = part / "checkpoints" / "step-000001" / "state.json"
    doc = json.loads(state.read_text())
    del doc["hooks"]["ewc"]
    state.write_text(json.dumps(doc))
    with pytest.raises(RuntimeError, match="without EWC state"):
        run(_cfg(model_dir, part, ref, *ewc, "resume=true"), progress=False)


def test_ewc_pulls_towards_the_start(model_dir, tmp_path, ref):
    """A strong EWC penalty keeps the reference KL smaller than the unregularised run's."""
    plain = run(_cfg(model_dir, tmp_path / "p", ref, "train.lr=2e-2"), progress=False).summary["forgetting"]
    ewc = run(_cfg(model_dir, tmp_path / "e", ref, "train.lr=2e-2", "regularize.ewc.weight=1e4",
                   "regularize.ewc.samples=3", "regularize.ewc.data=train"), progress=False).summary["forgetting"]
    assert ewc["kl_base_to_adapted_mean"] < plain["kl_base_to_adapted_mean"]


def test_fisher_in_checkpoint_is_reused_and_online_accumulates(model_dir, tmp_path, ref):
    first = tmp_path / "t1"
    run(_cfg(model_dir, first, ref, "method=full", "train.lr=1e-3", "regularize.ewc.weight=1",
             "regularize.ewc.samples=2", "regularize.ewc.online=true", "regularize.ewc.decay=0.5"), progress=False)
    ck = sorted((first / "checkpoints").glob("step-*"))[-1] / "optimizer.safetensors"
    t = load_file(str(ck))
    name = next(k for k in t if k.startswith("hook.ewc.fisher."))[len("hook.ewc.fisher."):]
    nf = t[f"hook.ewc.next_fisher.{name}"]
    assert not torch.equal(nf, 0.5 * t[f"hook.ewc.fisher.{name}"])  # + F_new of task 1
    fisher, stars = load_fisher(first)  # a run dir: its latest checkpoint, the online (next_*) tensors
    assert torch.equal(fisher[name], nf) and name in stars
    second = run(_cfg(model_dir, tmp_path / "t2", ref, "method=full", "train.lr=1e-3", "regularize.ewc.weight=1",
                      f"regularize.ewc.fisher_file={first}"), progress=False)
    assert second.summary["regularize"]["ewc"]["data"].startswith("fisher_file")
