"""Fault harness, part 3: NaN/inf injection. A diverging run stops with a diagnosis (step, loss,
gradient norm, lr, hint), exits non-zero, keeps its last finite checkpoint and writes no NaN."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from deltatune.cli import main
from deltatune.config import load_config
from deltatune.train.config import TrainConfig
from deltatune.train.data import epoch_order
from deltatune.train.guard import DivergenceError, DivergenceGuard
from deltatune.train.loop import run


def _strict_json(text: str) -> Any:
    def refuse(x: str) -> None:
        raise AssertionError(f"bare {x} in JSON output")

    return json.loads(text, parse_constant=refuse)


def _finite_checkpoints(out: Path) -> list[str]:
    names = []
    for ck in sorted((out / "checkpoints").glob("step-*")):
        for t in load_file(str(ck / "trainable.safetensors")).values():
            assert bool(torch.isfinite(t).all()), f"{ck} holds non-finite weights"
        names.append(ck.name)
    return names


def _train_args(model_dir: Path, out: Path, *sets: str) -> list[str]:
    base = [f"model.spec={model_dir}", f"output_dir={out}", "data.num_train=16", "data.num_eval=2",
            "eval.before=false", "eval.exact_match=false", "train.batch_size=2", "train.save_every=1",
            "lora.r=4", "lora.target_modules=[q_proj,v_proj]", *sets]
    return ["train", "--no-progress", *[a for s in base for a in ("--set", s)]]


def test_lr_inf_is_refused_before_anything_runs(model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_train_args(model_dir, tmp_path / "run", "train.lr=inf", "train.max_steps=3")) == 2
    assert "'train.lr' expects a finite float" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_huge_lr_stops_with_a_diagnosis_and_keeps_the_last_good_checkpoint(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(_train_args(model_dir, out, "train.lr=1e30", "train.max_steps=6")) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err or "training collapsed at step" in err
    for word in ("loss", "gradient norm", "lr ", "Hint:", "last good checkpoint is kept"):
        assert word in err, word
    kept = _finite_checkpoints(out)
    assert kept, "the last good checkpoint must survive"
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    assert "training" in (out / "error.txt").read_text()
    rows = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # the diagnosis names the step after the last logged one: the bad step never reached the weights
    failed = int(err.split(" at step ")[1].split(":")[0])
    assert failed == rows[-1]["step"] + 1 and kept[-1] == f"step-{rows[-1]['step']:06d}"


def test_a_poisoned_batch_stops_at_its_step(tmp_path: Path) -> None:
    """One record holds a token whose input embedding is NaN: the run stops at the step whose batch
    holds it, with the checkpoints before it intact and finite."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.testing import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).float()
    n = 12
    order = epoch_order(n, 0, 0)
    poisoned = order[4]  # batch index 2 with batch_size 2: optimizer step 3
    records = [{"instruction": f"Repeat {i}", "output": f"ok {i}"} for i in range(n)]
    records[poisoned]["output"] = "ok ¤¤"
    bad_ids = set(tok("¤", add_special_tokens=False)["input_ids"])
    clean = {t for r in records if "¤" not in r["output"] for t in tok(json.dumps(r), add_special_tokens=False)["input_ids"]}
    assert bad_ids and not bad_ids & clean
    with torch.no_grad():
        model.get_input_embeddings().weight[sorted(bad_ids)] = float("nan")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "run"
    cfg = load_config(TrainConfig, None, [f"data.train_file={data}", f"output_dir={out}", "train.batch_size=2",
                                          "train.max_steps=6", "train.save_every=1", "eval.before=false",
                                          "eval.exact_match=false", "lora.r=4", "lora.target_modules=[q_proj,v_proj]"])
    with pytest.raises(DivergenceError, match=r"training diverged at step 3: non-finite loss \(loss nan") as e:
        run(cfg, model=model, tokenizer=tok, progress=False)
    assert "lr " in str(e.value) and "step-000002" in str(e.value)
    assert _finite_checkpoints(out) == ["step-000001", "step-000002"]
    assert [_strict_json(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


class _Tiny(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(4, vocab)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def test_guard_decisions() -> None:
    g = DivergenceGuard(_Tiny(50))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    g.check_step(1, 2.0, None, 1e-3, [p])  # healthy: no error
    with pytest.raises(DivergenceError, match="non-finite gradient"):
        g.check_step(4, 2.0, float("inf"), 1e-3, [p])
    with pytest.raises(DivergenceError, match="step 1: non-finite loss"):
        g.check_step(1, float("nan"), 1.0, 1e-3, [p])
    p.grad = torch.zeros(3)
    with pytest.raises(DivergenceError, match=r"collapsed at step 7: loss 3\.912023 = ln V \(V = 50\)"):
        g.check_step(7, math.log(50), None, 5e5, [p])
    g.check_step(7, math.log(50) + 0.5, None, 5e5, [p])  # zero gradient alone is no collapse
    with torch.no_grad():
        p[0] = float("nan")
    p.requires_grad_(True)
    m = torch.nn.Module()
    m.w = p
    with pytest.raises(DivergenceError, match="trainable parameter 'w' holds non-finite"):
        g.check_params(m, 9)
