"""Multi-task adapters in one run: routing (each task's gradient reaches only its adapter), one PEFT
adapter per task saved, the task × adapter loss matrix, resume ≡ uninterrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltatune
from deltatune.config import load_config
from deltatune.io import load_adapter
from deltatune.objectives.multitask import MultiTask
from deltatune.testing import build_tiny_tokenizer, make_tiny_llama
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run


def _task_file(path: Path, answer: str, n: int = 10) -> Path:
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                       {"role": "assistant", "content": f"{answer} {i}"}]})
                              for i in range(n)))
    return path


@pytest.fixture
def tasks(tmp_path: Path) -> dict[str, Path]:
    return {"alpha": _task_file(tmp_path / "a.jsonl", "Paris"), "beta": _task_file(tmp_path / "b.jsonl", "Lisbon", 7)}


def _cfg(model_dir: Path, out: Path, tasks: dict[str, Path], *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        "objective=multitask", f"model.spec={model_dir}", "model.dtype=fp32", "train.bf16=false", "train.lr=1e-2",
        "train.batch_size=4", f"output_dir={out}", "lora.r=4", "forgetting.enabled=false",
        "data.tasks={" + ", ".join(f"{k}: '{v}'" for k, v in tasks.items()) + "}", *extra])


def _grads(model, name):
    return [t.grad for _, layer in deltatune.lora_layers(model) for t in layer.factors(name)]


def test_each_tasks_gradient_reaches_only_its_adapter(tasks, tmp_path):
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    cfg = _cfg(tmp_path, tmp_path / "o", tasks)
    obj = MultiTask(cfg)
    from deltatune.train.runtime import Runtime

    model, _, splits = obj.setup(cfg, Runtime(torch.device("cpu"), False), model=model, processor=tok)
    deltatune.inject(model, cfg.lora)
    obj.after_apply(model)
    from deltatune.inject import get_state

    assert sorted(get_state(model).configs) == ["alpha", "beta"]
    with torch.no_grad():  # B ≠ 0 so that A gets gradients too
        for _, layer in deltatune.lora_layers(model):
            for n in layer.adapters:
                layer.factors(n)[1].normal_(0, 0.1)
    a_rows = [r for r in splits.train if r["task"] == "alpha"][:3]
    b_rows = [r for r in splits.train if r["task"] == "beta"][:2]
    obj.loss_sum(model, obj.collate(a_rows)).backward()
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model, "alpha"))
    assert all(g is None or g.abs().sum() == 0 for g in _grads(model, "beta"))
    alone = [g.clone() for g in _grads(model, "alpha")]
    model.zero_grad(set_to_none=True)
    obj.loss_sum(model, obj.collate(a_rows + b_rows)).backward()  # a mixed batch
    for g, ref in zip(_grads(model, "alpha"), alone):  # alpha's gradient: from alpha's rows only
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(model, "beta"))


def test_multitask_run_saves_adapter_per_task_and_resumes(model_dir, tasks, tmp_path):
    res = run(_cfg(model_dir, tmp_path / "a", tasks, "train.max_steps=4", "forgetting.enabled=true",
                   f"forgetting.reference_file={tasks['alpha']}"), progress=False)
    s = res.summary
    m = s["after"]["task_loss"]
    assert set(m) == {"alpha", "beta"} and set(m["alpha"]) == {"alpha", "beta"}
    assert m["alpha"]["alpha"] < m["alpha"]["beta"] and m["beta"]["beta"] < m["beta"]["alpha"]  # separate adapters
    assert s["data"]["tasks"]["beta"] == {"train_rows": 6, "eval_rows": 1, "file_rows": 7}
    assert set(s["forgetting"]["tasks"]) == {"alpha", "beta"}
    for task in ("alpha", "beta"):
        d = tmp_path / "a" / "adapters" / task
        assert json.loads((d / "adapter_config.json").read_text())["peft_type"] == "LORA"
        load_adapter(make_tiny_llama(vocab_size=len(build_tiny_tokenizer())), d)
    part = tmp_path / "b"
    assert run(_cfg(model_dir, part, tasks, "train.max_steps=4"), progress=False, stop_after_steps=2).interrupted
    run(_cfg(model_dir, part, tasks, "train.max_steps=4", "resume=true"), progress=False)
    losses = [json.loads(x)["loss"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert losses == ref
