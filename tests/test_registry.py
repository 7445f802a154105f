"""The one dispatch table: README, --help and the registry list the same methods; every adapter kind
saves, is described by `deltatune info`, and the method sections of TrainConfig come from it;
model.quantize works under every adapter method; `deltatune eval` uses EvalConfig's defaults."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

import deltatune
from deltatune.cli import _train_help, main
from deltatune.config import load_config
from deltatune.quant.linear4bit import Linear4bit
from deltatune.registry import ADAPTERS, METHODS, OBJECTIVES, apply_method, kind_of, sections
from deltatune.testing import make_tiny_llama
from deltatune.train.config import TrainConfig
from deltatune.train.hooks import RunInfo

ROOT = Path(__file__).resolve().parents[1]
# 'mix' needs adapters to mix: tests/test_matrix.py and tests/compose cover it.
ADAPTER_METHODS = [m for m, row in METHODS.items() if row.saves == "adapter" and m != "mix"]
SMALL = {"lora": ["lora.r=2", "lora.target_modules=[q_proj,v_proj]"], "qlora": ["lora.r=2"], "dora": ["lora.r=2"],
         "vera": ["vera.r=4"], "adalora": ["adalora.init_r=4", "adalora.target_r=2"], "bottleneck": ["bottleneck.r=4"],
         "prompt_tuning": ["prompt.num_virtual_tokens=3"], "prefix_tuning": ["prompt.num_virtual_tokens=3"],
         "p_tuning_v2": ["prompt.num_virtual_tokens=3"]}


def _readme_methods() -> list[str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| method | Δf(x) | trains |"):].split("\n\n")[0].splitlines()[2:]
    return [m.group(1) for row in table if (m := re.match(r"\| `([a-z0-9_]+)`", row))]


def test_readme_help_and_registry_list_the_same_methods() -> None:
    help_block = _train_help().split("Methods (--set method=NAME):\n")[1].split("\n\n")[0]
    in_help = [line.split()[0] for line in help_block.splitlines()]
    assert in_help == list(METHODS)
    objectives = _train_help().split("Objectives (--set objective=NAME):\n")[1].split("\n\n")[0]
    assert [line.split()[0] for line in objectives.splitlines()] == list(OBJECTIVES)
    assert sorted(_readme_methods()) == sorted(METHODS)


def test_train_config_sections_come_from_the_registry() -> None:
    cfg = TrainConfig()
    for sec in sections():
        assert isinstance(getattr(cfg, sec.name), sec.cls)
    assert cfg.lora.r == 16 and cfg.lora.target_modules == "all-linear"  # TrainConfig's own lora default
    with pytest.raises(ValueError, match="method must be one of"):
        load_config(TrainConfig, None, ["method=lorra"])


def _cfg(method: str, *extra: str) -> Any:
    return load_config(TrainConfig, None, [f"method={method}", *SMALL.get(method, []), *extra])


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_every_adapter_is_described_by_info(method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = make_tiny_llama()
    cfg = _cfg(method)
    apply_method(model, cfg, RunInfo(total_steps=4, steps_per_epoch=4))
    state = model.deltatune_state
    assert METHODS[method].adapter is kind_of(state.configs["default"])
    deltatune.save_adapter(model, tmp_path / "a")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    n = int(re.search(r"adapted modules: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert n > 0, out
    if method == "lora":
        assert n == 4 and "ranks: {2: 4}" in out
    if method == "vera":
        assert n == 4 and "ranks: {4: 4}" in out  # q_proj, v_proj in 2 blocks, r = 4
    if method == "adalora":
        assert n == 4 and "ranks: {4: 4}" in out
    if method == "bottleneck":
        assert "ranks: {4:" in out


def test_every_kind_has_a_unique_file_format() -> None:
    types = [t for k in ADAPTERS.values() for t in k.peft_types]
    assert len(types) == len(set(types))
    assert {m.adapter.name for m in METHODS.values() if m.adapter is not None} == set(ADAPTERS)


@pytest.mark.parametrize("method", [m for m in ADAPTER_METHODS if m != "qlora"] + ["head"])
def test_model_quantize_under_every_method_that_allows_it(method: str) -> None:
    """model.quantize=nf4: the base linears become 4-bit, what the method trains still gets a gradient,
    and the 4-bit weights stay frozen."""
    model = make_tiny_llama()
    cfg = _cfg(method, "model.quantize=nf4")
    apply_method(model, cfg, RunInfo(total_steps=4, steps_per_epoch=4))
    q = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert q and all(m.quant_state.quant_type == "nf4" for m in q)
    ids = torch.randint(3, 100, (2, 6))
    model(input_ids=ids).logits.float().pow(2).mean().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in trained)
    assert not any(p.requires_grad for m in q for p in m.parameters())


def test_qlora_is_lora_plus_nf4_and_full_refuses_a_4bit_base() -> None:
    a, b = make_tiny_llama(), make_tiny_llama()
    apply_method(a, _cfg("qlora"), RunInfo(total_steps=1, steps_per_epoch=1))
    apply_method(b, _cfg("lora", "lora.r=2", "model.quantize=nf4"), RunInfo(total_steps=1, steps_per_epoch=1))
    ids = torch.randint(3, 100, (2, 6))
    torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits)
    with pytest.raises(ValueError, match="4-bit base"):
        _cfg("full", "model.quantize=nf4")
    fp4 = make_tiny_llama()
    apply_method(fp4, _cfg("lora", "model.quantize=fp4"), RunInfo(total_steps=1, steps_per_epoch=1))
    assert {m.quant_state.quant_type for m in fp4.modules() if isinstance(m, Linear4bit)} == {"fp4"}
    four_bit = make_tiny_llama()
    apply_method(four_bit, _cfg("lora", "model.quantize=nf4"), RunInfo(total_steps=1, steps_per_epoch=1))
    deltatune.unload(four_bit, merge_adapters=False)  # now a 4-bit base as from a 4-bit checkpoint
    with pytest.raises(ValueError, match="4-bit checkpoint"):
        apply_method(four_bit, _cfg("partial"), RunInfo(total_steps=1, steps_per_epoch=1))


def test_eval_uses_eval_config_defaults(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from deltatune import generate as evaluate
    from deltatune.train.config import EvalConfig

    seen: dict[str, Any] = {}

    def fake(model: Any, tok: Any, prompts: Any, **kw: Any) -> list[str]:
        seen.update(kw)
        return ["x"] * len(prompts)

    monkeypatch.setattr(evaluate, "generate_texts", fake)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": "Say hi", "output": "hi"}) for _ in range(2)))
    assert main(["eval", "--data", str(data), "--model", str(model_dir)]) == 0
    assert seen == {"max_new_tokens": EvalConfig().max_new_tokens, "batch_size": EvalConfig().batch_size}
    assert main(["eval", "--data", str(data), "--model", str(model_dir), "--batch-size", "3",
                 "--max-new-tokens", "5"]) == 0
    assert seen == {"max_new_tokens": 5, "batch_size": 3}
    capsys.readouterr()
