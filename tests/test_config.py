"""Config machinery (deltatune.config) and TrainConfig (deltatune.train.config), incl. every shipped YAML."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from deltatune.config import (
    ConfigError,
    apply_overrides,
    from_dict,
    help_text,
    keys,
    load_config,
    load_yaml,
    missing_docs,
    to_dict,
)
from deltatune.methods.lora_config import LoraConfig
from deltatune.registry import METHODS
from deltatune.train.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@dataclass
class Inner:
    n: int = field(default=1, metadata={"doc": "an int"})
    names: list[str] | str = field(default="all", metadata={"doc": "list or str"})


@dataclass
class Outer:
    x: float = field(default=0.5, metadata={"doc": "a float"})
    flag: bool = field(default=False, metadata={"doc": "a bool"})
    opt: str | None = field(default=None, metadata={"doc": "optional str"})
    ids: list[int] = field(default_factory=list, metadata={"doc": "ints"})
    ranks: dict[str, int] = field(default_factory=dict, metadata={"doc": "map"})
    pair: tuple[float, float] = field(default=(0.9, 0.99), metadata={"doc": "pair"})
    mode: bool | Literal["auto"] = field(default="auto", metadata={"doc": "tri-state"})
    inner: Inner = field(default_factory=Inner, metadata={"doc": "section"})


def test_from_dict_coerces_and_nests() -> None:
    cfg = from_dict(
        Outer,
        {
            "x": "1e-4",  # PyYAML reads 1e-4 as a string: float fields accept it
            "ids": [1, 2.0],
            "ranks": {"q": 4},
            "pair": [0.8, 0.9],
            "mode": True,
            "inner": {"n": "3", "names": ["a", "b"]},
        },
    )
    assert cfg.x == pytest.approx(1e-4) and isinstance(cfg.x, float)
    assert cfg.ids == [1, 2] and all(type(i) is int for i in cfg.ids)
    assert cfg.ranks == {"q": 4}
    assert cfg.pair == (0.8, 0.9)
    assert cfg.mode is True
    assert cfg.inner == Inner(n=3, names=["a", "b"])
    assert from_dict(Outer, {"inner": {"names": "q_proj"}}).inner.names == "q_proj"  # str stays str


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"inner": {"nn": 2}}, ["cfg.yaml", "unknown key 'inner.nn'", "did you mean 'inner.n'"]),
        ({"n": 2}, ["unknown key 'n'", "did you mean 'inner.n'"]),  # right key, wrong section
        ({"zzz": 2}, ["unknown key 'zzz'", "valid keys"]),
        ({"x": "fast"}, ["'x' expects float", "'fast' (str)"]),
        ({"flag": "yes please"}, ["'flag' expects bool"]),
        ({"flag": 1}, ["'flag' expects bool", "1 (int)"]),
        ({"ids": [1, "two"]}, ["'ids[1]' expects int", "'two'"]),
        ({"ids": 3}, ["'ids' expects list[int]"]),  # scalars are not silently wrapped
        ({"mode": "sometimes"}, ["'mode' expects bool | 'auto'"]),
        ({"pair": [0.1]}, ["'pair' expects 2 values"]),
        ({"inner": 5}, ["'inner' is a section"]),
    ],
)
def test_from_dict_errors_name_source_key_and_value(data: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(Outer, data, where="cfg.yaml")
    for frag in fragments:
        assert frag in str(exc.value)


def test_partial_section_keeps_the_parents_defaults() -> None:
    cfg = from_dict(TrainConfig, {"lora": {"alpha": 8}, "train": None})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 8.0, "all-linear")
    assert cfg.train == TrainConfig().train
    with pytest.raises(ConfigError, match="unknown key 'lora.rank'"):
        from_dict(TrainConfig, {"lora": {"rank": 8}})  # merging must not hide unknown keys


def test_post_init_errors_are_wrapped_with_source_and_section() -> None:
    with pytest.raises(ConfigError, match=r"my.yaml: invalid 'lora': lora.r must be an integer >= 1"):
        from_dict(TrainConfig, {"lora": {"r": 0}}, where="my.yaml")


def test_to_dict_round_trips_through_yaml() -> None:
    cfg = from_dict(Outer, {"pair": [0.1, 0.2], "inner": {"names": ["a"]}, "ranks": {"k": 2}})
    data = yaml.safe_load(yaml.safe_dump(to_dict(cfg)))
    assert from_dict(Outer, data) == cfg
    tc = TrainConfig()
    assert from_dict(TrainConfig, yaml.safe_load(yaml.safe_dump(to_dict(tc)))) == tc


def test_apply_overrides() -> None:
    cfg = TrainConfig()
    new = apply_overrides(
        cfg,
        [
            "lora.r=8",
            "train.lr=1e-4",
            "lora.target_modules=[q_proj,v_proj]",
            "train.bf16=false",
            "data.train_file=a.jsonl",
        ],
    )
    assert new.lora.r == 8 and new.lora.alpha == 32.0  # other lora fields keep the TrainConfig defaults
    assert new.train.lr == pytest.approx(1e-4)
    assert new.lora.target_modules == ["q_proj", "v_proj"]
    assert new.train.bf16 is False
    assert new.data.train_file == "a.jsonl"
    assert cfg.lora.r == 16  # the input is not mutated
    assert apply_overrides(cfg, ["lora={r: 4}"]).lora.target_modules == "all-linear"  # section update merges


@pytest.mark.parametrize(
    ("item", "fragment"),
    [
        ("train.lrr=1", "unknown key 'train.lrr' — did you mean 'train.lr'"),
        ("lr=1", "did you mean 'train.lr'"),
        ("lora.rank=4", "did you mean 'lora.r'"),  # too short for difflib alone
        ("lora.lora_alpha=4", "did you mean 'lora.alpha'"),  # PEFT's spelling
        ("train.lr.x=1", "'train.lr' is a float value, not a section"),
        ("train.lr", "must look like 'section.key=value'"),
        ("lora.r=-1", "lora.r must be an integer >= 1"),
        ("train.lr=abc", "'train.lr' expects float"),
    ],
)
def test_apply_overrides_errors(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        apply_overrides(TrainConfig(), [item])
    assert fragment in str(exc.value) and "--set" in str(exc.value)


def test_load_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1\n  epochs: [1, 2\nmodel: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: YAML syntax error"):
        load_yaml(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("train:\n  lr: 1\n  lr: 2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml:3:\d+: .*duplicate key 'lr' \(first on line 2\)"):
        load_yaml(dup)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_yaml(lst)
    with pytest.raises(ConfigError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


def test_load_config_file_then_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-3\n  epochs: 2\nlora:\n  rr: 4\n")
    with pytest.raises(ConfigError, match=rf"{p}: unknown key 'lora.rr' — did you mean 'lora.r'"):
        load_config(TrainConfig, p)
    p.write_text("train:\n  lr: 1.0e-3\n  epochs: 2\n")
    cfg = load_config(TrainConfig, p, ["train.epochs=3"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.epochs == 3


def test_help_text_lists_every_key_with_type_default_and_doc() -> None:
    text = help_text(TrainConfig)
    for key in keys(TrainConfig):
        assert f"  {key}: " in text, key
    assert "lora.r: int = 16" in text  # TrainConfig's own LoRA defaults, not LoraConfig's
    assert "train.bf16: bool | 'auto' = 'auto'" in text
    assert "(undocumented)" not in text
    assert missing_docs(TrainConfig) == []


def test_missing_docs_detects_undocumented_fields() -> None:
    @dataclass
    class Bad:
        a: int = 1
        b: Inner = field(default_factory=Inner, metadata={"doc": "ok"})

    assert missing_docs(Bad) == ["a"]


def test_train_config_defaults_and_validation() -> None:
    cfg = TrainConfig()
    assert cfg.method == "lora" and cfg.method in METHODS
    assert isinstance(cfg.lora, LoraConfig)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 32.0, "all-linear")
    assert cfg.data.train_file is None and (cfg.data.num_train, cfg.data.num_eval) == (320, 40)
    assert cfg.train.lr == pytest.approx(5e-4) and cfg.train.max_grad_norm == 1.0
    assert "{timestamp}" not in str(cfg.resolve_output_dir())


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"method": "lorra"}, "method must be one of"),
        ({"resume": True}, "resume: true needs the output_dir"),
        ({"method": "partial", "partial": {"top_n_layers": 0}}, "would train nothing"),
        ({"train": {"warmup_ratio": 1.5}}, "train.warmup_ratio must be in [0, 1)"),
        ({"train": {"max_steps": 0}}, "train.max_steps must be -1"),
        ({"train": {"schedule": "step"}}, "'train.schedule' must be one of 'cosine', 'linear', 'constant'"),
        ({"model": {"device": "gpu"}}, "model.device must be"),
        ({"data": {"format": "jsonl"}}, "'data.format' must be one of"),
        ({"data": {"eval_file": "e.jsonl"}}, "data.eval_file is set but data.train_file is null"),
        ({"data": {"max_length": 2}}, "data.max_length must be >= 8"),
    ],
)
def test_train_config_validation_messages(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, data, where="t.yaml")
    assert fragment in str(exc.value)


def test_shipped_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"default.yaml", "alpaca_lora.yaml", "chat_full.yaml", "partial.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_parses(path: Path) -> None:
    cfg = from_dict(TrainConfig, load_yaml(path), where=str(path))
    assert cfg.method in METHODS


def test_default_yaml_is_exactly_the_defaults() -> None:
    path = next(p for p in CONFIGS if p.name == "default.yaml")
    assert from_dict(TrainConfig, load_yaml(path)) == TrainConfig()
