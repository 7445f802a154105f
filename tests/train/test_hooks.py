"""Hooks: names checked, several coexist, their state rides in checkpoints (and pre-hook checkpoints
load into AdaLoRA's allocator); an AdaLoRA run resumed from a checkpoint equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltatune.train.checkpoint import load_checkpoint, save_checkpoint
from deltatune.train.hooks import after_step, check_hooks, extra_loss


class Counter:
    """A stateful hook: counts steps, adds counter·Σw² as its extra loss."""

    def __init__(self, name: str, w: torch.nn.Parameter) -> None:
        self.name, self.w, self.count = name, w, 0

    def extra_loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        return (self.count + 1) * self.w.pow(2).sum()

    def after_step(self, step: int) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "tensors": {"w_copy": self.w.detach() * 2}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.loaded = state["tensors"]["w_copy"]


class Silent:
    name = "silent"

    def extra_loss(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def test_hooks_coexist_and_names_are_checked() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    hooks = check_hooks([Counter("a", w), Silent(), Counter("b", w)])
    torch.testing.assert_close(extra_loss(hooks, torch.nn.Linear(1, 1)), torch.tensor(10.0))  # 5 + 5, None skipped
    after_step(hooks, 0)
    assert [getattr(h, "count", None) for h in hooks] == [1, None, 1]
    assert extra_loss([Silent()], torch.nn.Linear(1, 1)) is None
    with pytest.raises(ValueError, match="unique"):
        check_hooks([Counter("a", w), Counter("a", w)])
    with pytest.raises(ValueError, match="A-Za-z0-9"):
        check_hooks([Counter("a.b", w)])
    with pytest.raises(TypeError, match="not a Hook"):
        check_hooks([object()])  # type: ignore[list-item]


def test_hook_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    a, b = Counter("a", w), Counter("b", w)
    a.count, b.count = 3, 7
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, [a, b, Silent()])
    a2, b2 = Counter("a", w), Counter("b", w)
    assert load_checkpoint(path, model, opt, sched, [a2, b2, Silent()]) == {"step": 1}
    assert (a2.count, b2.count) == (3, 7)
    torch.testing.assert_close(a2.loaded, torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError, match=r"hooks \['b'\]"):  # a checkpoint with state this run cannot take
        load_checkpoint(path, model, opt, sched, [Counter("a", w), Silent()])


def test_checkpoint_from_before_hooks_loads_into_the_allocator(tmp_path: Path) -> None:
    """The old layout: state.json "method" and tensors "method.<key>" (AdaLoRA's allocator)."""
    model, opt, sched = _setup()
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    old = Counter("adalora_ranks", w)
    old.count = 4
    path = save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, [old])
    state = json.loads((path / "state.json").read_text())
    state["method"] = state.pop("hooks")["adalora_ranks"]
    (path / "state.json").write_text(json.dumps(state))
    tensors = {k.replace("hook.adalora_ranks.", "method."): v for k, v in load_file(path / "optimizer.safetensors").items()}
    save_file(tensors, str(path / "optimizer.safetensors"))
    new = Counter("adalora_ranks", w)
    load_checkpoint(path, model, opt, sched, [new])
    assert new.count == 4
    torch.testing.assert_close(new.loaded, torch.tensor([2.0, 4.0]))


def test_adalora_resume_through_the_loop_equals_uninterrupted(model_dir: Path, tmp_path: Path) -> None:
    from deltatune.config import load_config
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import run

    def cfg(out: Path, *extra: str) -> TrainConfig:
        sets = [f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=16", "data.num_eval=2",
                "train.batch_size=4", "train.lr=1e-2", f"output_dir={out}", "eval.exact_match=false",
                "eval.before=false", "train.bf16=false", "method=adalora", "adalora.init_r=4", "adalora.target_r=2",
                *extra]
        return load_config(TrainConfig, None, sets)

    full = run(cfg(tmp_path / "full"), progress=False)
    part = tmp_path / "part"
    assert run(cfg(part), progress=False, stop_after_steps=2).interrupted
    resumed = run(cfg(part, "resume=true"), progress=False)
    def losses(d: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]

    assert losses(part) == losses(tmp_path / "full") and len(full.losses) == 4
    assert resumed.losses == full.losses[2:]
    saved = [json.loads((d / "adapter" / "adapter_config.json").read_text()) for d in (tmp_path / "full", part)]
    assert saved[0]["rank_pattern"] == saved[1]["rank_pattern"] and saved[0]["total_step"] == 4
