"""The training loop and CLI end to end on a tiny random Llama with a locally built tokenizer:
train, interrupt and resume (losses equal an uninterrupted run), every strategy, merge, generate, eval, info."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltatune.cli import main
from deltatune.config import load_config
from deltatune.train.config import TrainConfig
from deltatune.train.loop import lr_lambda, run


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    base = [f"model.spec={model_dir}", "model.dtype=fp32", "data.num_train=24", "data.num_eval=4",
            "train.batch_size=4", "train.lr=1e-3", f"output_dir={out}", "eval.max_new_tokens=8",
            "train.bf16=false", "lora.r=4", "lora.dropout=0.1"]
    out_args: list[str] = []
    for kv in base + list(extra):
        out_args += ["--set", kv]
    return out_args


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_equals_uninterrupted(model_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert main(["train", "--no-progress", *_args(model_dir, full)]) == 0
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 6 and (full / "adapter" / "adapter_config.json").exists()
    assert (full / "loss.png").stat().st_size > 1000
    preds = [json.loads(x) for x in (full / "predictions_after.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and {"reference", "prediction", "exact_match"} <= preds[0].keys()
    assert {"before", "after", "trainable_params", "tokens_per_s", "peak_memory_mb"} <= summary.keys()

    # Interrupted after 2 steps (as Ctrl-C would), then resumed.
    part = tmp_path / "part"
    cfg = load_config(TrainConfig, None, [a for a in _args(model_dir, part) if a != "--set"])
    res = run(cfg, progress=False, stop_after_steps=2)
    assert res.interrupted and (part / "checkpoints").exists()
    assert main(["train", "--no-progress", "--resume", *_args(model_dir, part)]) == 0
    assert _losses(part) == _losses(full)
    assert len(_losses(full)) == 6


@pytest.mark.parametrize("method", ["full", "head", "partial"])
def test_strategies_train_and_save_full_weights(method: str, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    extra = ["train.max_steps=2", f"method={method}", "partial.top_n_layers=1"]
    assert main(["train", "--no-progress", *_args(model_dir, out, *extra)]) == 0
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base_sd = base.state_dict()
    changed = {n for n, p in trained.state_dict().items() if not torch.equal(p, base_sd[n])}
    if method == "head":
        assert changed == {"lm_head.weight"}
    elif method == "partial":
        assert changed and all(n.startswith("model.layers.1.") for n in changed)
    else:
        assert any(n.startswith("model.layers.0.") for n in changed)


def test_merge_generate_eval_info(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["train", "--no-progress", *_args(model_dir, out, "train.max_steps=2")]) == 0
    # make the adapter non-trivial so merge is checked for real
    from safetensors.torch import load_file, save_file
    w = out / "adapter" / "adapter_model.safetensors"
    tensors = {k: (torch.randn_like(v) * 0.1 if "lora_B" in k else v) for k, v in load_file(w).items()}
    save_file(tensors, str(w))
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--out", str(merged),
                 "--dtype", "fp32"]) == 0
    from deltatune import load_adapter
    ids = torch.randint(0, 100, (1, 10))
    ref = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")(ids).logits
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(ids).logits, ref, rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(out / "adapter"), "--prompt", "hi",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "Say hi", "output": "hi"}) for _ in range(3)))
    assert main(["eval", "--data", str(data), "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["examples"] == 3 and math.isfinite(res["ppl"]) and "exact_match" in res
    assert main(["info", str(out / "adapter")]) == 0
    text = capsys.readouterr().out
    assert "adapted modules: 14" in text and "ranks: {4: 14}" in text


def test_bad_config_key_is_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "lora.rank=4"]) == 2
    assert "did you mean 'lora.r'" in capsys.readouterr().err.lower()


def test_lr_schedule() -> None:
    assert lr_lambda(0, 10, 2, "cosine") == 0.5 and lr_lambda(1, 10, 2, "cosine") == 1.0
    assert lr_lambda(2, 10, 2, "cosine") == 1.0 and abs(lr_lambda(6, 10, 2, "cosine") - 0.5) < 1e-12
    assert lr_lambda(6, 10, 2, "linear") == 0.5 and lr_lambda(9, 10, 0, "constant") == 1.0


def test_sigterm_writes_a_checkpoint_and_resume_finishes(model_dir: Path, tmp_path: Path) -> None:
    """A real signal (as Ctrl-C/SIGTERM): the run finishes its step, checkpoints, exits 130."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sig"
    args = _args(model_dir, out, "data.num_train=400", "train.batch_size=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "train", "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, text[-2000:]
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and "resume with" in text
    done = int(ckpts[0].name.split("-")[1])
    assert 2 <= done < 200 and not (out / "summary.json").exists()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_model_passed_in_keeps_its_exact_base_weights(model_dir: Path, tmp_path: Path, dtype: str) -> None:
    """run() merges LoRA for the final evaluation; merge + unmerge alone moves ~1-2 % of the base
    weights by an ulp. A caller's model must come back with the base bits it had."""
    from deltatune.inject import lora_layers
    from deltatune.models import load_model

    model, tok = load_model(model_dir, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = load_config(TrainConfig, None, [a for a in _args(model_dir, tmp_path / "r", "train.lr=5e-2")
                                          if a != "--set"])
    run(cfg, model=model, tokenizer=tok, progress=False)
    layers = list(lora_layers(model))
    assert layers and any(float(layer.lora_B["default"].weight.abs().max()) > 0 for _, layer in layers)
    for name, layer in layers:
        w = layer.base_layer.weight
        orig = before[name.removesuffix(".base_layer") + ".weight"]
        assert w.dtype == orig.dtype and torch.equal(w.view(torch.int16 if w.element_size() == 2 else torch.int32),
                                                     orig.view(torch.int16 if w.element_size() == 2 else torch.int32)), name


@pytest.mark.parametrize("method", ["full", "head", "partial", "lora"])
def test_16bit_model_trains_evaluates_and_saves_in_its_dtype(method: str, model_dir: Path, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A bf16 model with train.bf16=false: the fp32 master copies of what trains would meet bf16
    layers without autocast (and generation runs without autocast). Autocast is turned on with a
    warning, and the trained weights go back to bf16 before saving and the final evaluation."""
    out = tmp_path / method
    extra = ["train.max_steps=2", f"method={method}", "partial.top_n_layers=1", "model.dtype=bf16"]
    if method == "lora":
        extra.append("lora.modules_to_save=[lm_head]")
    with caplog.at_level("WARNING", logger="deltatune.train"):
        assert main(["train", "--no-progress", *_args(model_dir, out, *extra)]) == 0
    assert "using bf16 autocast anyway" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bf16"] is True and summary["after"]["exact_match"] is not None
    if method == "lora":
        from safetensors.torch import load_file

        saved = load_file(out / "adapter" / "adapter_model.safetensors")
        head = [v for k, v in saved.items() if "lm_head" in k]
        assert head and all(v.dtype == torch.bfloat16 for v in head)
        return
    trained = AutoModelForCausalLM.from_pretrained(out / "model", dtype="auto")
    assert {p.dtype for p in trained.parameters()} == {torch.bfloat16}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).state_dict()
    assert any(not torch.equal(p, base[n]) for n, p in trained.state_dict().items())


def test_log_every_logs_steps_when_progress_bars_are_off(model_dir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    cfg = load_config(TrainConfig, None, [a for a in _args(model_dir, tmp_path / "r", "train.max_steps=3",
                                                           "train.log_every=2", "eval.exact_match=false",
                                                           "eval.before=false") if a != "--set"])
    with caplog.at_level("INFO", logger="deltatune.train"):
        run(cfg, progress=False)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 1 and lines[0].startswith("step 2/3: loss ")
