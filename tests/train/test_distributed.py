"""Several processes ≡ one: torchrun launches on CPU (gloo), tiny models, a few steps.

PyTorch's own FSDPTest skips itself without 2 CUDA devices, so these tests start the processes
themselves: ``python -m torch.distributed.run --standalone`` (a free port each time) runs
tests/train/distributed_worker.py, which trains every case of a spec in ONE launch (a launch costs
~15-20 s of imports) and writes losses and per-rank shard checks to JSON. The one-process
references run here, in the test process.

Same global batch: per-process batch 2 × 2 processes × grad_accum 1 ≡ batch 2 × 1 × grad_accum 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltatune.config import load_config
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run

pytestmark = pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 7),
    reason="FSDP2 (fully_shard) on CPU/gloo needs torch >= 2.7",
)

SRC = Path(__file__).resolve().parents[2] / "src"
WORKER = Path(__file__).with_name("distributed_worker.py")

# method → its overrides; every case runs 3 steps (AdaLoRA 4: warm-up, prune, final) at lr 1e-2 so
# adapters move well away from their init.
CASES: dict[str, list[str]] = {
    "lora": ["method=lora"],
    "qlora": ["method=qlora"],
    "adalora": ["method=adalora", "adalora.init_r=4", "adalora.target_r=2", "adalora.tinit=1",
                "adalora.tfinal=1", "train.max_steps=4"],
    "full": ["method=full", "train.lr=0.001"],
    # EWC: the Fisher estimated identically on every rank, the penalty on the live (sharded) weights
    "lora_ewc": ["method=lora", "regularize.ewc.weight=1e4", "regularize.ewc.samples=2"],
    "full_ewc": ["method=full", "train.lr=0.001", "regularize.ewc.weight=1e4", "regularize.ewc.samples=2"],
}
# every other method: one more launch, in the slow run
MORE_CASES: dict[str, list[str]] = {
    "dora": ["method=dora"],
    "vera": ["method=vera", "vera.r=8"],
    "bottleneck": ["method=bottleneck", "bottleneck.r=4"],
    "prompt_tuning": ["method=prompt_tuning", "prompt.num_virtual_tokens=4"],
    "prefix_tuning": ["method=prefix_tuning", "prompt.num_virtual_tokens=4"],
    "p_tuning_v2": ["method=p_tuning_v2", "prompt.num_virtual_tokens=4"],
    "partial": ["method=partial", "partial.top_n_layers=1", "train.lr=0.001"],
    "head": ["method=head", "train.lr=0.001"],
}
# and adapters under FSDP2 when asked for (AdaLoRA's hooks keep its adapter whole on every rank)
FSDP2_CASES: dict[str, list[str]] = {
    f"{n}_fsdp2": [*e, "runtime.strategy=fsdp2"]
    for n, e in [("adalora", CASES["adalora"]), ("dora", MORE_CASES["dora"]), ("vera", MORE_CASES["vera"]),
                 ("bottleneck", MORE_CASES["bottleneck"]), ("prefix_tuning", MORE_CASES["prefix_tuning"])]
}
TRAINS_BASE = {"full", "full_ewc", "partial", "head"}  # runtime.strategy auto → fsdp2 for these


def _common(model_dir: Path, data: Path, out: Path, world: int) -> list[str]:
    # evaluation after training (loss + 4 generated tokens on 6 held-out rows): under FSDP2 every
    # rank generates in lockstep through the sharded model
    return [f"model.spec={model_dir}", "model.device=cpu", "model.dtype=fp32", f"data.train_file={data}",
            f"data.eval_file={data.with_name('eval.jsonl')}", "data.format=alpaca", "data.max_length=64",
            "train.batch_size=2", f"train.grad_accum={2 // world}", "train.max_steps=3", "train.bf16=false",
            "train.lr=0.01", "eval.before=false", "eval.max_new_tokens=4", "lora.r=4", "lora.alpha=8",
            "lora.target_modules=all-linear", f"output_dir={out}"]


def _write_data(path: Path, n: int = 24) -> Path:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "and", "then", "sleeps", "in", "the", "warm", "sun"]
    rows = [{"instruction": " ".join(words[: 2 + i % 7]), "input": str(i),
             "output": " ".join(reversed(words[: 3 + (i * 5) % 11]))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path.with_name("eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    return path


def _launch(spec: dict[str, Any], tmp: Path, nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    spec_path = tmp / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    return subprocess.run(_torchrun(nproc) + [str(WORKER), str(spec_path)], env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _saved(out: Path) -> dict[str, torch.Tensor]:
    adapter = out / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else out / "model" / "model.safetensors"))


def _assert_same_files(a: Path, b: Path, atol: float = 2e-5) -> None:
    ta, tb = _saved(a), _saved(b)
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.allclose(ta[k].float(), tb[k].float(), atol=atol, rtol=1e-4), (k, (ta[k] - tb[k]).abs().max())


def _assert_adapter_moved(out: Path) -> None:
    t = _saved(out)
    b = [v for k, v in t.items() if "lora_B" in k]
    assert b and all(float(v.abs().max()) > 1e-4 for v in b), "lora_B still zero: the test would prove nothing"


@pytest.fixture(scope="module")
def launched(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One 2-process launch for every equality and resume check; one-process runs around it."""
    tmp = tmp_path_factory.mktemp("dist")
    data = _write_data(tmp / "train.jsonl")
    one: dict[str, Any] = {}
    for name, extra in CASES.items():  # the one-process references
        res = run(load_config(TrainConfig, None, _common(model_dir, data, tmp / f"1p-{name}", 1) + extra),
                  progress=False)
        one[name] = res.losses
        one[name + "/after"] = res.summary["after"]
        one[name + "/forgetting"] = res.summary["forgetting"]
    # resume 1 → 2: the first two steps on one process (strategy fsdp2 is read only by the second part)
    r12 = _common(model_dir, data, tmp / "r12", 1) + ["method=lora", "runtime.strategy=fsdp2"]
    run(load_config(TrainConfig, None, r12), progress=False, stop_after_steps=2)

    cases = [{"name": n, "overrides": _common(model_dir, data, tmp / f"2p-{n}", 2) + e} for n, e in CASES.items()]
    cases += [
        {"name": "lora_fsdp2", "check_slices": True,
         "overrides": _common(model_dir, data, tmp / "2p-lora_fsdp2", 2) + ["method=lora", "runtime.strategy=fsdp2"]},
        {"name": "qlora_fsdp2", "check_slices": True,
         "overrides": _common(model_dir, data, tmp / "2p-qlora_fsdp2", 2) + ["method=qlora", "runtime.strategy=fsdp2"]},
        {"name": "qlora_fsdp2_replicated",
         "overrides": _common(model_dir, data, tmp / "2p-qlora_fsdp2_replicated", 2)
         + ["method=qlora", "runtime.strategy=fsdp2", "runtime.shard_4bit=false"]},
        {"name": "r12", "check_slices": True,
         "overrides": _common(model_dir, data, tmp / "r12", 2) + ["method=lora", "runtime.strategy=fsdp2",
                                                                   "resume=true"]},
        {"name": "r21", "stop_after_steps": 2,
         "overrides": _common(model_dir, data, tmp / "r21", 2) + ["method=lora", "runtime.strategy=fsdp2"]},
    ]
    t0 = time.perf_counter()
    proc = _launch({"out": str(tmp), "cases": cases}, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    seconds = time.perf_counter() - t0
    # resume 2 → 1
    r21 = run(load_config(TrainConfig, None, _common(model_dir, data, tmp / "r21", 1) + ["method=lora", "resume=true"]),
              progress=False)
    two = json.loads((tmp / "results.json").read_text())
    slices = [json.loads((tmp / f"slices_rank{r}.json").read_text()) for r in range(2)]
    return {"tmp": tmp, "one": one, "two": two, "slices": slices, "r21": r21.losses, "seconds": seconds}


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_one_process_losses_and_files(launched: dict[str, Any], name: str) -> None:
    one, two = launched["one"][name], launched["two"][name]["losses"]
    assert len(one) == len(two) >= 3
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6)
    tmp = launched["tmp"]
    _assert_same_files(tmp / f"1p-{name}", tmp / f"2p-{name}")
    if name not in TRAINS_BASE:
        _assert_adapter_moved(tmp / f"2p-{name}")
    after1, after2 = launched["one"][name + "/after"], launched["two"][name]["after"]
    assert after2["eval_loss"] == pytest.approx(after1["eval_loss"], rel=1e-5)
    assert after2["exact_match"] == after1["exact_match"] and "exact_match" in after2
    # the forgetting report: measured on every rank (FSDP2's forwards are collective), rank 0's the same
    f1, f2 = launched["one"][name + "/forgetting"], launched["two"][name]["summary"]["forgetting"]
    assert "skipped" not in f1 and "skipped" not in f2, (f1, f2)
    for key in ("loss_before", "loss_after", "kl_base_to_adapted_mean", "kl_base_to_adapted_max"):
        assert f2[key] == pytest.approx(f1[key], rel=1e-4, abs=1e-7), key
    assert f1["kl_base_to_adapted_mean"] > 0  # the run moved the model: the equality is not 0 = 0
    # auto: DDP for adapters on a replicated base, FSDP2 when base weights train
    assert launched["two"][name]["summary"]["strategy"] == ("fsdp2" if name in TRAINS_BASE else "ddp")


@pytest.mark.slow
def test_every_other_method_gives_one_process_numbers(model_dir: Path, tmp_path: Path) -> None:
    data = _write_data(tmp_path / "train.jsonl")
    todo = {**MORE_CASES, **FSDP2_CASES}
    one = {n: run(load_config(TrainConfig, None, _common(model_dir, data, tmp_path / f"1p-{n}", 1) + e),
                  progress=False).losses for n, e in todo.items()}
    cases = [{"name": n, "overrides": _common(model_dir, data, tmp_path / f"2p-{n}", 2) + e}
             for n, e in todo.items()]
    proc = _launch({"out": str(tmp_path), "cases": cases}, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    two = json.loads((tmp_path / "results.json").read_text())
    for name in todo:
        assert len(set(one[name])) > 1, name  # the loss moved: something trained
        assert two[name]["losses"] == pytest.approx(one[name], rel=1e-5, abs=1e-6), name
        _assert_same_files(tmp_path / f"1p-{name}", tmp_path / f"2p-{name}")
        fsdp2 = name in TRAINS_BASE or name in FSDP2_CASES
        assert two[name]["summary"]["strategy"] == ("fsdp2" if fsdp2 else "ddp"), name


def test_adalora_prunes_the_same_ranks_on_every_process_count(launched: dict[str, Any]) -> None:
    tmp = launched["tmp"]
    cfgs = [json.loads((tmp / d / "adapter" / "adapter_config.json").read_text()) for d in ("1p-adalora", "2p-adalora")]
    assert cfgs[0]["rank_pattern"] == cfgs[1]["rank_pattern"]
    # the budget shrank (4 → 2 on average): pruning happened, so the masks were computed and agreed
    kept = [m for masks in cfgs[1]["rank_pattern"].values() for m in masks]
    assert 0 < sum(kept) < len(kept)


def test_fsdp2_adapter_equals_ddp_and_every_rank_slice_is_in_the_files(launched: dict[str, Any]) -> None:
    tmp = launched["tmp"]
    assert launched["two"]["lora_fsdp2"]["summary"]["strategy"] == "fsdp2"
    _assert_same_files(tmp / "1p-lora", tmp / "2p-lora_fsdp2")
    # evaluated unmerged through the sharded model, on both ranks in lockstep: the same numbers
    after = launched["two"]["lora_fsdp2"]["after"]
    assert after["eval_loss"] == pytest.approx(launched["one"]["lora/after"]["eval_loss"], rel=1e-5)
    for rank, s in enumerate(launched["slices"]):
        for key in ("lora_fsdp2/adapter", "lora_fsdp2/checkpoint", "r12/adapter", "r12/checkpoint"):
            assert s[key]["checked"] > 0 and s[key]["dtensors"] == s[key]["checked"], (rank, key, s[key])
            assert s[key]["bad"] == [], (rank, key, s[key]["bad"][:3])


@pytest.mark.parametrize("case", ["qlora_fsdp2", "qlora_fsdp2_replicated"])
def test_4bit_base_under_fsdp2_sharded_or_replicated(launched: dict[str, Any], case: str) -> None:
    """The packed uint8 NF4 weights shard like any parameter (no "Cannot flatten integer dtype
    tensors"), or stay replicated; either way the numbers are one process's."""
    tmp = launched["tmp"]
    assert launched["two"][case]["losses"] == pytest.approx(launched["one"]["qlora"], rel=1e-5, abs=1e-6)
    _assert_same_files(tmp / "1p-qlora", tmp / f"2p-{case}")
    if case == "qlora_fsdp2":
        for s in launched["slices"]:
            assert s["qlora_fsdp2/adapter"]["bad"] == [] and s["qlora_fsdp2/adapter"]["dtensors"] > 0


def test_saved_keys_are_clean(launched: dict[str, Any]) -> None:
    for d in ("2p-lora", "2p-lora_fsdp2", "2p-full"):
        for k in _saved(launched["tmp"] / d):
            assert "_checkpoint_wrapped_module" not in k and "module." not in k.replace("base_model.model.", "", 1)
            assert "_fsdp" not in k and "_orig_mod" not in k


def test_resume_across_process_counts(launched: dict[str, Any]) -> None:
    tmp, ref = launched["tmp"], launched["one"]["lora"]
    assert launched["two"]["r12"]["losses"] == pytest.approx(ref[2:], rel=1e-5)  # 1 process → 2
    _assert_same_files(tmp / "1p-lora", tmp / "r12")
    assert launched["two"]["r21"]["interrupted"]
    assert launched["r21"] == pytest.approx(ref[2:], rel=1e-5)  # 2 processes → 1
    _assert_same_files(tmp / "1p-lora", tmp / "r21")


def test_one_failing_rank_ends_every_rank_with_its_message(model_dir: Path, tmp_path: Path) -> None:
    data = _write_data(tmp_path / "train.jsonl")
    spec = {"out": str(tmp_path), "fail": {"rank": 1, "after_batches": 2},
            "cases": [{"name": "lora", "overrides": _common(model_dir, data, tmp_path / "run", 2)
                       + ["method=lora", "train.max_steps=1000"]}]}
    t0 = time.perf_counter()
    proc = _launch(spec, tmp_path, timeout=150)  # a hang fails the test with TimeoutExpired
    assert proc.returncode != 0
    assert "bad record on rank 1" in proc.stdout + proc.stderr
    assert time.perf_counter() - t0 < 150


def test_sigterm_checkpoints_once_on_every_rank_and_exits(model_dir: Path, tmp_path: Path) -> None:
    """``torchrun -m deltatune train``; SIGTERM to torchrun (as a scheduler sends it) reaches both
    workers; they agree on the step to stop after, write one checkpoint, and exit."""
    data = _write_data(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    cmd = _torchrun(2) + ["-m", "deltatune", "train", "--no-progress"]
    for o in _common(model_dir, data, out, 2) + ["method=lora", "train.max_steps=100000"]:
        cmd += ["--set", o]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1, text[-4000:]
    step = json.loads((ckpts[0] / "state.json").read_text())["step"]
    assert 3 <= step < 100000
    assert len((out / "metrics.jsonl").read_text().splitlines()) == step  # rank 0 logged every step it took
    assert "finishing the current step" in text


def test_cpu_mmap_threshold_is_validated_and_left_alone_when_off_or_set_by_the_user(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.train.distributed import RuntimeConfig, _fix_mmap_threshold

    with pytest.raises(ValueError, match="cpu_mmap_threshold_kb"):
        RuntimeConfig(cpu_mmap_threshold_kb=-1)
    assert not _fix_mmap_threshold(0)  # 0 = glibc's own policy
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert not _fix_mmap_threshold(1 << 20)  # the environment's choice wins


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_mmap_threshold_is_set_on_glibc() -> None:
    # in a fresh process: the policy is process-wide and would otherwise stay set for this test session
    code = "from deltatune.train.distributed import _fix_mmap_threshold as f; print(f(1 << 20))"
    env = {k: v for k, v in _env().items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    import platform

    assert out.stdout.strip() == str(platform.libc_ver()[0] == "glibc")
