"""The bad-input table for tests/reliability/test_bad_inputs.py: one row = one case.

A case is ``argv`` (with ``{tmp}`` = the case's own directory, ``{model}`` = a tiny HF model
directory, ``{adapter}`` = a good LoRA adapter for it), the files to create first (name → text,
bytes, or a function of the case directory), the exit code, and substrings the error must contain
(the file/key/flag it names and what was expected). Rows are generated from smaller tables so
that a new kind of bad value is one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FileSpec = str | bytes | Callable[[Path, dict[str, Path]], None]


@dataclass
class Case:
    id: str
    argv: list[str]
    expect: list[str]  # substrings of stderr, all required (case-insensitive)
    files: dict[str, FileSpec] = field(default_factory=dict)
    code: int = 2


# Flags every train case gets: the tiny model, a small built-in task, its own output dir.
TRAIN = ["train", "--no-progress", "--set", "model.spec={model}", "--set", "output_dir={tmp}/run",
         "--set", "data.num_train=8", "--set", "data.num_eval=2", "--set", "eval.before=false"]


def _train(*sets: str, config: str | None = None) -> list[str]:
    argv = list(TRAIN)
    if config is not None:
        argv.insert(1, config)
    for s in sets:
        argv += ["--set", s]
    return argv


# --------------------------------------------------------------------------- config values
# (key, bad value as --set text, substrings beyond the key). Every row also runs from a YAML file.
CONFIG_VALUES: list[tuple[str, str, list[str]]] = [
    ("train.lr", "0", ["> 0"]), ("train.lr", "-1e-4", ["> 0"]), ("train.lr", "inf", ["finite"]),
    ("train.lr", "nan", ["finite"]), ("train.lr", ".inf", ["finite"]), ("train.lr", "fast", ["float"]),
    ("train.eps", "0", ["> 0"]), ("train.eps", "inf", ["finite"]), ("train.eps", "-1e-8", ["> 0"]),
    ("train.weight_decay", "-0.1", [">= 0"]), ("train.weight_decay", "nan", ["finite"]),
    ("train.betas", "[1.0, 0.9]", ["[0, 1)"]), ("train.betas", "[0.9]", ["2 values"]),
    ("train.betas", "[-0.1, 0.9]", ["[0, 1)"]), ("train.betas", "[.nan, 0.9]", ["finite"]),
    ("train.warmup_ratio", "1.5", ["[0, 1)"]), ("train.warmup_ratio", "-0.1", ["[0, 1)"]),
    ("train.warmup_steps", "-1", [">= 0"]), ("train.epochs", "0", [">= 1"]),
    ("train.max_steps", "0", ["-1"]), ("train.max_steps", "-2", ["-1"]), ("train.max_steps", "2.5", ["int"]),
    ("train.batch_size", "0", [">= 1"]), ("train.batch_size", "-4", [">= 1"]), ("train.batch_size", "1.5", ["int"]),
    ("train.grad_accum", "0", [">= 1"]), ("train.max_grad_norm", "-1", [">= 0"]),
    ("train.max_grad_norm", "inf", ["finite"]), ("train.eval_every", "-1", [">= 0"]),
    ("train.log_every", "-1", [">= 0"]), ("train.save_every", "-5", [">= 0"]),
    ("train.loraplus_ratio", "-1", [">= 0"]), ("train.schedule", "cosin", ["'cosine'"]),
    ("train.optimizer", "sgd", ["'adamw'"]), ("train.bf16", "maybe", ["bool"]), ("train.seed", "x", ["int"]),
    ("lora.r", "0", [">= 1"]), ("lora.r", "-3", [">= 1"]), ("lora.r", "2.5", ["int"]),
    ("lora.alpha", "0", ["> 0"]), ("lora.alpha", "-8", ["> 0"]), ("lora.alpha", "inf", ["finite"]),
    ("lora.dropout", "1.0", ["[0, 1)"]), ("lora.dropout", "-0.1", ["[0, 1)"]),
    ("lora.rank_pattern", "{q_proj: 0}", ["rank_pattern['q_proj']", ">= 1"]),
    ("lora.rank_pattern", "{q_proj: -2}", ["rank_pattern['q_proj']", ">= 1"]),
    ("lora.alpha_pattern", "{q_proj: 0}", ["alpha_pattern['q_proj']", "> 0"]),
    ("lora.alpha_pattern", "{q_proj: .nan}", ["alpha_pattern", "finite"]),
    ("lora.layers_to_transform", "[-1]", ["layers_to_transform[0]", ">= 0"]),
    ("lora.bias", "some", ["'none'"]), ("lora.target_modules", "[]", ["empty"]),
    ("lora.init", "xavier", ["init"]),
    ("vera.r", "0", ["vera.r"]), ("vera.d_initial", "0", ["> 0"]), ("vera.dropout", "1", ["[0, 1)"]),
    ("adalora.init_r", "0", ["init_r"]), ("adalora.target_r", "99", ["init_r"]), ("adalora.alpha", "0", ["> 0"]),
    ("adalora.beta1", "1", ["(0, 1)"]), ("adalora.delta_t", "0", [">= 1"]),
    ("bottleneck.r", "0", [">= 1"]), ("bottleneck.placement", "sideways", ["placement"]),
    ("prompt.num_virtual_tokens", "0", [">= 1"]), ("prompt.init", "magic", ["init"]),
    ("data.max_length", "4", [">= 8"]), ("data.num_train", "0", ["> 0"]), ("data.num_eval", "-1", [">= 0"]),
    ("data.format", "xml", ["'alpaca'"]), ("data.train_file", "''", ["empty"]),
    ("eval.max_new_tokens", "0", [">= 1"]), ("eval.batch_size", "0", [">= 1"]),
    ("model.device", "gpu", ["'cpu'"]), ("model.dtype", "int8", ["'bf16'"]), ("model.spec", "' '", ["empty"]),
    ("partial.top_n_layers", "-1", [">= 0"]), ("method", "lorra", ["'lora'"]), ("output_dir", "' '", ["empty"]),
]

UNKNOWN_KEYS: list[tuple[str, str]] = [
    ("lora.rank=4", "lora.r"), ("train.learning_rate=1e-4", "valid keys"), ("lr=1e-4", "train.lr"),
    ("foo.bar=1", "foo"), ("train.lr.x=1", "not a section"), ("lora=5", "mapping"), ("=3", "section.key=value"),
    ("train.max_step=3", "train.max_steps"), ("data.train=x.jsonl", "did you mean"),
]


def _config_cases() -> list[Case]:
    out = []
    for i, (key, value, extra) in enumerate(CONFIG_VALUES):
        out.append(Case(f"set-{key}-{i}", _train(f"{key}={value}"), ["--set", key.split(".")[-1], *extra]))
        section, _, leaf = key.rpartition(".")
        body = f"{section}:\n  {leaf}: {value}\n" if section else f"{leaf}: {value}\n"
        out.append(Case(f"yaml-{key}-{i}", _train(config="{tmp}/c.yaml"), ["c.yaml", leaf, *extra],
                        files={"c.yaml": body}))
    for item, hint in UNKNOWN_KEYS:
        out.append(Case(f"unknown-{item}", _train(item), ["--set", hint]))
    combos = [
        (["method=partial", "partial.top_n_layers=99"], ["partial.top_n_layers=99", "only 2 blocks"]),
        (["method=partial", "partial.top_n_layers=0"], ["would train nothing"]),
        (["lora.layers_to_transform=[99]"], ["layers_to_transform=[99]", "0..1"]),
        (["lora.target_modules=[qproj]"], ["qproj", "q_proj"]),
        (["resume=true", "output_dir=runs/{{timestamp}}"], ["{timestamp}"]),
        (["resume=true", "overwrite=true"], ["exclude each other"]),
        (["method=prompt_tuning", "prompt.projection=true"], ["prefix_tuning"]),
        (["method=prefix_tuning", "train.gradient_checkpointing=true"], ["gradient_checkpointing"]),
        (["data.eval_file={tmp}/e.jsonl"], ["data.eval_file", "train_file"]),
        (["model.device=cuda"], ["model.device", "cuda", "'cpu'"]),
        (["model.device=cuda:7"], ["model.device"]),
        (["partial.modules=[nosuch]", "method=partial"], ["partial.modules", "nosuch"]),
    ]
    for i, (sets, expect) in enumerate(combos):
        out.append(Case(f"combo-{i}", _train(*sets), expect))
    return out


# --------------------------------------------------------------------------- YAML files
def _yaml_cases() -> list[Case]:
    rows: list[tuple[str, FileSpec, list[str]]] = [
        ("non-utf8", b"train:\n  lr: \xff\xfe\n", ["c.yaml:2", "UTF-8"]),
        ("syntax", "train:\n  lr: [1\n", ["c.yaml:", "YAML syntax error"]),
        ("duplicate", "train:\n  lr: 1e-4\n  lr: 2e-4\n", ["c.yaml:3", "duplicate key 'lr'"]),
        ("top-level-list", "- a\n- b\n", ["c.yaml", "mapping"]),
        ("section-scalar", "lora: 5\n", ["c.yaml", "'lora'", "mapping"]),
        ("unknown-section", "loar:\n  r: 4\n", ["c.yaml", "loar", "lora"]),
        ("tab-indent", "train:\n\tlr: 1\n", ["c.yaml", "YAML"]),
        ("bad-type-list", "lora:\n  target_modules: 5\n", ["c.yaml", "target_modules"]),
        ("binary", b"\x00\x01\x02\x03" * 8, ["c.yaml"]),
        ("null-key-type", "lora:\n  r: null\n", ["c.yaml", "lora.r", "int"]),
    ]
    out = [Case(f"yaml-file-{n}", _train(config="{tmp}/c.yaml"), e, files={"c.yaml": body}) for n, body, e in rows]
    out.append(Case("yaml-missing", _train(config="{tmp}/nope.yaml"), ["nope.yaml", "cannot read"]))
    out.append(Case("yaml-directory", _train(config="{tmp}/cdir"), ["cdir", "is a directory"],
                    files={"cdir/x": "x"}))
    return out


# --------------------------------------------------------------------------- data files
def _parquet(rows: list[dict[str, Any]]) -> Callable[[Path, dict[str, Path]], None]:
    def make(path: Path, _: dict[str, Path]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)

    return make


GOOD_ALPACA = '{"instruction": "Say hi", "output": "hi"}'
DATA_ROWS: list[tuple[str, str, FileSpec, list[str]]] = [
    # (id, file name, content, expected substrings)
    ("jsonl-bad-json", "d.jsonl", GOOD_ALPACA + "\n{oops\n", ["d.jsonl:2", "invalid JSON"]),
    ("jsonl-non-utf8", "d.jsonl", (GOOD_ALPACA + "\n").encode() + b'{"text": "\xff"}\n', ["d.jsonl:2", "UTF-8"]),
    ("jsonl-not-object", "d.jsonl", GOOD_ALPACA + "\n[1, 2]\n", ["d.jsonl:2", "JSON object"]),
    ("jsonl-missing-output", "d.jsonl", GOOD_ALPACA + '\n{"instruction": "x"}\n', ["d.jsonl:2", "'output'"]),
    ("jsonl-null-output", "d.jsonl", '{"instruction": "x", "output": null}\n', ["d.jsonl:1", "'output' is null"]),
    ("jsonl-empty-output", "d.jsonl", '{"instruction": "x", "output": "  "}\n', ["d.jsonl:1", "'output' is empty"]),
    ("jsonl-output-number", "d.jsonl", '{"instruction": "x", "output": 5}\n', ["d.jsonl:1", "must be a string"]),
    ("jsonl-empty-text", "d.jsonl", '{"text": ""}\n', ["d.jsonl:1", "'text' is empty"]),
    ("jsonl-no-format", "d.jsonl", '{"prompt": "x", "answer": "y"}\n', ["d.jsonl:1", "cannot detect"]),
    ("jsonl-chat-no-assistant", "d.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n',
     ["d.jsonl:1", "no assistant turn"]),
    ("jsonl-chat-bad-role", "d.jsonl",
     '{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     ["d.jsonl:1", "unknown role 'human'"]),
    ("jsonl-chat-assistant-first", "d.jsonl", '{"messages": [{"role": "assistant", "content": "x"}]}\n',
     ["d.jsonl:1", "no user turn"]),
    ("jsonl-chat-not-list", "d.jsonl", '{"messages": "hello"}\n', ["d.jsonl:1", "messages"]),
    ("jsonl-chat-null", "d.jsonl", '{"messages": null}\n', ["d.jsonl:1", "'messages' is null"]),
    ("jsonl-chat-turn-not-object", "d.jsonl", '{"messages": ["hi"]}\n', ["d.jsonl:1", "turn 0"]),
    ("jsonl-chat-empty-assistant", "d.jsonl",
     '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}\n',
     ["d.jsonl:1", "empty assistant"]),
    ("jsonl-chat-content-number", "d.jsonl",
     '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}\n',
     ["d.jsonl:1", "string"]),
    ("jsonl-sharegpt-bad-from", "d.jsonl",
     '{"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]}\n',
     ["d.jsonl:1", "unknown 'from' 'robot'"]),
    ("jsonl-empty-file", "d.jsonl", "", ["d.jsonl", "no records"]),
    ("jsonl-blank-lines", "d.jsonl", "\n\n  \n", ["d.jsonl", "no records"]),
    ("json-invalid", "d.json", '[{"text": "a"},', ["d.json:1", "invalid JSON"]),
    ("json-not-list", "d.json", '{"rows": []}', ["d.json", "list of records"]),
    ("json-non-utf8", "d.json", b'[{"text": "\xff"}]', ["d.json", "UTF-8"]),
    ("json-record-bad", "d.json", '[{"instruction": "x", "output": "y"}, {"instruction": "x"}]',
     ["d.json (record 1)", "'output'"]),
    ("json-data-key-bad", "d.json", '{"data": [{"text": 5}]}', ["d.json (record 0)", "'text'"]),
    ("csv-ragged", "d.csv", "instruction,output\nhi,there\nx,y,z\n", ["d.csv:3", "more than the 2 header"]),
    ("csv-short", "d.csv", "instruction,output\nhi,there\nonly\n", ["d.csv:3", "fewer cells"]),
    ("csv-missing-column", "d.csv", "instruction,answer\nhi,there\n", ["d.csv:2", "missing key 'output'"]),
    ("csv-empty-output", "d.csv", "instruction,output\nhi,\n", ["d.csv:2", "'output' is empty"]),
    ("csv-messages-bad-json", "d.csv", 'messages\n"[{""role"": ""user"""\n', ["d.csv:2", "not valid JSON"]),
    ("csv-non-utf8", "d.csv", b"text\n\xff\xfe\n", ["d.csv", "UTF-8"]),
    ("csv-header-only", "d.csv", "instruction,output\n", ["d.csv", "no records"]),
    ("tsv-ragged", "d.tsv", "instruction\toutput\nhi\tthere\tmore\n", ["d.tsv:2", "header columns"]),
    ("parquet-missing-output", "d.parquet", _parquet([{"instruction": "x", "input": "y"}]),
     ["d.parquet (record 0)", "'output'"]),
    ("parquet-null-text", "d.parquet", _parquet([{"text": "ok"}, {"text": None}]),
     ["d.parquet (record 1)", "'text' is null"]),
    ("parquet-no-format", "d.parquet", _parquet([{"q": "x"}]), ["d.parquet (record 0)", "cannot detect"]),
    ("parquet-truncated", "d.parquet", b"PAR1\x00\x00", ["d.parquet"]),
    ("unsupported-ext", "d.txt", "hello\n", ["d.txt", "unsupported data file type"]),
    ("directory", "ddir", lambda p, _: (p.mkdir(), (p / "x.jsonl").write_text(GOOD_ALPACA)), ["ddir", "is a directory"]),
    ("all-beyond-max-length", "d.jsonl",
     json.dumps({"instruction": "word " * 60, "output": "answer"}) + "\n",
     ["no training example has a loss token", "max_length=16", "d.jsonl:1"]),
]


def _data_cases() -> list[Case]:
    out = []
    for name, fname, body, expect in DATA_ROWS:
        extra = ["data.max_length=16"] if name == "all-beyond-max-length" else []
        out.append(Case(f"data-{name}", _train(f"data.train_file={{tmp}}/{fname}", *extra), expect,
                        files={fname: body}))
    # the same problems in an eval file (the train file is good)
    alpaca_shaped = DATA_ROWS[:7]  # an eval file is read in the train file's format (alpaca here)
    for name, fname, body, expect in alpaca_shaped:
        out.append(Case(f"eval-file-{name}", _train("data.train_file={tmp}/good.jsonl",
                                                    f"data.eval_file={{tmp}}/e-{fname}"),
                        [f"e-{expect[0]}", *expect[1:]],
                        files={"good.jsonl": GOOD_ALPACA + "\n", f"e-{fname}": body}))
    # and given to `deltatune eval`
    for name, fname, body, expect in DATA_ROWS[:20]:
        out.append(Case(f"cli-eval-{name}", ["eval", "--model", "{model}", "--data", f"{{tmp}}/{fname}",
                                             "--no-generate"], expect, files={fname: body}))
    out.append(Case("data-missing", _train("data.train_file={tmp}/none.jsonl"), ["none.jsonl", "not found"]))
    out.append(Case("data-format-mismatch", _train("data.train_file={tmp}/d.jsonl", "data.format=chat"),
                    ["d.jsonl:1", "'messages'"], files={"d.jsonl": GOOD_ALPACA + "\n"}))
    out.append(Case("eval-zero-tokens", ["eval", "--model", "{model}", "--data", "{tmp}/d.jsonl", "--max-length", "8",
                                         "--no-generate"], ["d.jsonl", "no example has a loss token", "--max-length"],
                    files={"d.jsonl": json.dumps({"instruction": "word " * 40, "output": "x"}) + "\n"}))
    return out


# --------------------------------------------------------------------------- adapter directories
def _adapter_copy(mutate: Callable[[Path], None]) -> Callable[[Path, dict[str, Path]], None]:
    def make(path: Path, fx: dict[str, Path]) -> None:
        import shutil

        shutil.copytree(fx["adapter"], path)
        mutate(path)

    return make


def _tensors(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        from safetensors import safe_open
        from safetensors.torch import save_file

        f = path / "adapter_model.safetensors"
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
            tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 - safe_open has no __iter__
        edit(tensors)
        save_file(tensors, str(f), metadata=meta)

    return mutate


def _set_config(**changes: Any) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        f = path / "adapter_config.json"
        cfg = json.loads(f.read_text())
        cfg.update(changes)
        f.write_text(json.dumps(cfg))

    return mutate


def _first(tensors: dict[str, Any], suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


def _nan(t: dict[str, Any]) -> None:
    t[_first(t, "lora_B.weight")].fill_(float("nan"))


def _inf(t: dict[str, Any]) -> None:
    t[_first(t, "lora_A.weight")][0, 0] = float("inf")


def _int32(t: dict[str, Any]) -> None:
    k = _first(t, "lora_A.weight")
    t[k] = t[k].to(__import__("torch").int32)


def _wrong_shape(t: dict[str, Any]) -> None:
    import torch

    k = _first(t, "lora_A.weight")
    t[k] = torch.zeros(t[k].shape[0], t[k].shape[1] + 3)


def _bad_module(t: dict[str, Any]) -> None:
    for k in [k for k in t if ".layers.0." in k]:
        t[k.replace(".layers.0.", ".layers.7.")] = t.pop(k)


def _drop_b(t: dict[str, Any]) -> None:
    del t[_first(t, "lora_B.weight")]


ADAPTER_ROWS: list[tuple[str, Callable[[Path], None] | None, list[str]]] = [
    ("nan", _tensors(_nan), ["adapter_model.safetensors", "lora_B", "non-finite"]),
    ("inf", _tensors(_inf), ["adapter_model.safetensors", "lora_A", "non-finite"]),
    ("int32", _tensors(_int32), ["adapter_model.safetensors", "lora_A", "int32", "floating point"]),
    ("wrong-shape", _tensors(_wrong_shape), ["ad", "shape", "different base model"]),
    ("missing-module", _tensors(_bad_module), ["ad", "layers.7", "does not exist"]),
    ("missing-b", _tensors(_drop_b), ["adapter_model.safetensors", "lacks its lora_B"]),
    ("rank-mismatch", _set_config(r=2), ["ad", "rank 4 in the file but the config says 2"]),
    ("peft-type", _set_config(peft_type="IA3"), ["adapter_config.json", "IA3"]),
    ("truncated", lambda p: (p / "adapter_model.safetensors").write_bytes(
        (p / "adapter_model.safetensors").read_bytes()[:200]), ["adapter_model.safetensors", "truncated"]),
    ("empty-weights", lambda p: (p / "adapter_model.safetensors").write_bytes(b""),
     ["adapter_model.safetensors"]),
    ("no-weights", lambda p: (p / "adapter_model.safetensors").unlink(), ["adapter_model.safetensors", "not found"]),
    ("no-config", lambda p: (p / "adapter_config.json").unlink(), ["adapter_config.json", "not found"]),
    ("config-invalid-json", lambda p: (p / "adapter_config.json").write_text("{"), ["adapter_config.json", "invalid JSON"]),
    ("config-not-object", lambda p: (p / "adapter_config.json").write_text("[1]"),
     ["adapter_config.json", "JSON object"]),
]


def _adapter_cases() -> list[Case]:
    out = []
    commands = {
        "generate": ["generate", "--model", "{model}", "--adapter", "{tmp}/ad", "--prompt", "hi", "--max-new-tokens", "2"],
        "eval": ["eval", "--model", "{model}", "--adapter", "{tmp}/ad", "--data", "{tmp}/d.jsonl", "--no-generate"],
        "merge": ["merge", "--model", "{model}", "--adapter", "{tmp}/ad", "--out", "{tmp}/merged"],
    }
    for name, mutate, expect in ADAPTER_ROWS:
        for cmd, argv in commands.items():
            files: dict[str, FileSpec] = {"ad": _adapter_copy(mutate or (lambda p: None)),
                                          "d.jsonl": GOOD_ALPACA + "\n"}
            out.append(Case(f"adapter-{name}-{cmd}", argv, expect, files=files))
    out.append(Case("adapter-missing", commands["generate"], ["ad", "not found"]))
    out.append(Case("adapter-is-file", commands["merge"], ["ad", "not found"], files={"ad": "x"}))
    out.append(Case("info-missing", ["info", "{tmp}/nothing"], ["nothing", "not found"]))
    out.append(Case("info-truncated", ["info", "{tmp}/ad"], ["adapter_model.safetensors", "truncated"],
                    files={"ad": _adapter_copy(ADAPTER_ROWS[8][1])}))  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- model directories / GGUF
def _model_copy(mutate: Callable[[Path], None]) -> Callable[[Path, dict[str, Path]], None]:
    def make(path: Path, fx: dict[str, Path]) -> None:
        import shutil

        shutil.copytree(fx["model"], path)
        mutate(path)

    return make


def _unlink(*names: str) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        for n in names:
            (p / n).unlink()

    return mutate


MODEL_ROWS: list[tuple[str, str, FileSpec, list[str]]] = [
    ("missing", "m", lambda p, _: None, ["m", "does not exist"]),
    ("not-gguf-file", "m.bin", b"\x00" * 64, ["m.bin", "not a .gguf file"]),
    ("empty-gguf", "m.gguf", b"", ["m.gguf", "empty"]),
    ("junk-gguf", "m.gguf", b"\x07" * 64, ["m.gguf", "GGUF"]),
    ("truncated-gguf", "m.gguf", b"GGUF\x03\x00\x00\x00", ["m.gguf", "truncated"]),
    ("truncated-gguf-2", "m.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 20, ["m.gguf"]),
    ("dir-no-config", "m", lambda p, _: (p.mkdir(), (p / "x.txt").write_text("x")), ["m", "config.json"]),
    ("truncated-safetensors", "m", _model_copy(lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:1000])), ["m", "model.safetensors", "truncated"]),
    ("empty-safetensors", "m", _model_copy(lambda p: (p / "model.safetensors").write_bytes(b"")),
     ["m", "model.safetensors"]),
    ("no-tokenizer", "m", _model_copy(_unlink("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")),
     ["m", "no tokenizer files"]),
    ("config-invalid-json", "m", _model_copy(lambda p: (p / "config.json").write_text("{")), ["m"]),
    ("two-ggufs", "m", lambda p, _: (p.mkdir(), (p / "a.gguf").write_bytes(b"x"), (p / "b.gguf").write_bytes(b"x")),
     ["m", "2 .gguf files"]),
]


def _model_cases() -> list[Case]:
    out = []
    for name, fname, body, expect in MODEL_ROWS:
        files = {} if name == "missing" else {fname: body}
        out.append(Case(f"model-{name}-train", _train(f"model.spec={{tmp}}/{fname}"), expect, files=files))
        out.append(Case(f"model-{name}-generate", ["generate", "--model", f"{{tmp}}/{fname}", "--prompt", "hi"],
                        expect, files=files))
    for name, fname, body, expect in MODEL_ROWS[:6]:
        files = {} if name == "missing" else {fname: body}
        out.append(Case(f"model-{name}-quantize", ["quantize", f"{{tmp}}/{fname}", "--out", "{tmp}/q"],
                        expect, files=files))
    return out


# --------------------------------------------------------------------------- CLI flags and outputs
def _flag_cases() -> list[Case]:
    gen = ["generate", "--model", "{model}", "--prompt", "hi"]
    ev = ["eval", "--model", "{model}", "--data", "{tmp}/d.jsonl"]
    rows: list[tuple[str, list[str], list[str]]] = [
        ("temperature-neg", gen + ["--temperature", "-1"], ["--temperature", ">= 0"]),
        ("temperature-nan", gen + ["--temperature", "nan"], ["--temperature", "finite"]),
        ("top-p-5", gen + ["--top-p", "5"], ["--top-p", "(0, 1]"]),
        ("top-p-0", gen + ["--top-p", "0"], ["--top-p", "(0, 1]"]),
        ("top-k-neg", gen + ["--top-k", "-1"], ["--top-k", ">= 0"]),
        ("max-new-0", gen + ["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
        ("max-new-text", gen + ["--max-new-tokens", "many"], ["--max-new-tokens", "integer"]),
        ("seed-text", gen + ["--seed", "x"], ["--seed", "int"]),
        ("eval-batch-0", ev + ["--batch-size", "0"], ["--batch-size", ">= 1"]),
        ("eval-max-length-0", ev + ["--max-length", "0"], ["--max-length", ">= 8"]),
        ("eval-max-new-0", ev + ["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
        ("quantize-block-0", ["quantize", "{model}", "--out", "{tmp}/q", "--block-size", "0"], ["--block-size", ">= 1"]),
        ("quantize-type", ["quantize", "{model}", "--out", "{tmp}/q", "--quant-type", "nf3"], ["--quant-type", "nf4"]),
        ("no-command", [], ["command"]),
        ("bad-command", ["trian"], ["invalid choice", "train"]),
        ("generate-no-prompt", ["generate", "--model", "{model}"], ["--prompt", "--messages"]),
        ("merge-no-adapter", ["merge", "--out", "{tmp}/m"], ["--adapter"]),
    ]
    out = [Case(f"flag-{n}", a, e, files={"d.jsonl": GOOD_ALPACA + "\n"}) for n, a, e in rows]
    msgs = [
        ("bad-json", '[{"role": "user", "content": "hi"}', ["m.json:1", "invalid JSON"]),
        ("not-list", '{"role": "user"}', ["m.json", "list"]),
        ("empty-list", "[]", ["m.json", "non-empty"]),
        ("missing-content", '[{"role": "user"}]', ["m.json", "content"]),
        ("non-utf8", b'[{"role": "user", "content": "\xff"}]', ["m.json", "UTF-8"]),
    ]
    for n, body, e in msgs:
        out.append(Case(f"messages-{n}", ["generate", "--model", "{model}", "--messages", "{tmp}/m.json"], e,
                        files={"m.json": body}))
    out.append(Case("messages-missing", ["generate", "--model", "{model}", "--messages", "{tmp}/none.json"],
                    ["none.json", "not found"]))
    out.append(Case("messages-dir", ["generate", "--model", "{model}", "--messages", "{tmp}/md"],
                    ["md", "is a directory"], files={"md/x": "x"}))
    merge = ["merge", "--model", "{model}", "--adapter", "{adapter}"]
    outs = [
        ("out-is-base-model", merge + ["--out", "{model}"], ["--out", "base model", "input"]),
        ("out-inside-base-model", merge + ["--out", "{model}/merged"], ["--out", "base model", "input"]),
        ("out-is-adapter", merge + ["--out", "{adapter}"], ["--out", "adapter", "input"]),
        ("out-is-file", merge + ["--out", "{tmp}/f.txt"], ["f.txt", "is a file"]),
        ("out-foreign-dir", merge + ["--out", "{tmp}/notes"], ["notes", "holds other files"]),
        ("out-4bit-is-base", merge + ["--into-4bit", "--out", "{model}"], ["--out", "base model", "input"]),
        ("out-4bit-is-data", merge + ["--into-4bit", "--data", "{tmp}/d.jsonl", "--out", "{tmp}/d.jsonl"],
         ["--out", "reference data", "input"]),
        ("out-4bit-is-file", merge + ["--into-4bit", "--out", "{tmp}/f.txt"], ["f.txt", "is a file"]),
        ("quantize-out-is-model", ["quantize", "{model}", "--out", "{model}"], ["--out", "model", "input"]),
        ("quantize-out-is-file", ["quantize", "{model}", "--out", "{tmp}/f.txt"], ["f.txt", "is a file"]),
        ("quantize-out-foreign", ["quantize", "{model}", "--out", "{tmp}/notes"], ["notes", "holds other files"]),
        ("export-out-is-model", ["export", "--format", "gguf", "--model", "{model}", "--out", "{model}"],
         ["--out", "base model", "input"]),
        ("export-out-in-model", ["export", "--format", "gguf", "--model", "{model}", "--out", "{model}/m.gguf"],
         ["--out", "base model", "input"]),
        ("export-out-is-adapter", ["export", "--format", "gguf", "--model", "{model}", "--adapter", "{adapter}",
                                   "--out", "{adapter}/a.gguf"], ["--out", "adapter", "input"]),
        ("export-out-is-dir", ["export", "--format", "gguf", "--model", "{model}", "--out", "{tmp}/notes"],
         ["notes", "is a directory"]),
    ]
    for n, a, e in outs:
        out.append(Case(f"merge-{n}", a, e, files={"f.txt": "keep", "notes/todo.txt": "keep me",
                                                   "d.jsonl": GOOD_ALPACA + "\n"}))
    return out


# --------------------------------------------------------------------------- run directories
def _stored_config(*sets: str) -> Callable[[Path, dict[str, Path]], None]:
    """config.json of a run made with TRAIN + ``sets`` (as the loop writes it)."""

    def make(path: Path, fx: dict[str, Path]) -> None:
        from deltatune.config import load_config, to_dict
        from deltatune.train.config import TrainConfig

        tmp = path.parent.parent
        overrides = [s.replace("{model}", str(fx["model"])).replace("{tmp}", str(tmp))
                     for s in TRAIN[3::2] + list(sets)]
        cfg = load_config(TrainConfig, None, overrides)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(to_dict(cfg), indent=2))

    return make


def _rundir_cases() -> list[Case]:
    out = [
        Case("rundir-fresh-in-used", _train(), ["run", "already holds a run", "--resume", "--overwrite"],
             files={"run/config.json": _stored_config(), "run/metrics.jsonl": '{"step": 1, "loss": 1.0}\n'}),
        Case("rundir-fresh-in-used-ckpt", _train("train.seed=4"), ["already holds a run", "checkpoints"],
             files={"run/config.json": _stored_config(), "run/checkpoints/step-000003/state.json": "{}"}),
        Case("rundir-unreadable-config", _train("resume=true"), ["config.json", "cannot be read"],
             files={"run/config.json": "{"}),
    ]
    changes = [("train.lr=0.001", "train.lr"), ("train.seed=3", "train.seed"), ("lora.r=8", "lora.r"),
               ("data.num_train=9", "data.num_train"), ("method=dora", "method"), ("train.batch_size=2", "train.batch_size"),
               ("lora.target_modules=[q_proj]", "lora.target_modules"), ("data.max_length=64", "data.max_length")]
    for s, key in changes:
        out.append(Case(f"resume-changed-{key}", _train(s, "resume=true"), ["--resume with a changed config", key, "→"],
                        files={"run/config.json": _stored_config()}))
    return out


def all_cases() -> list[Case]:
    cases = (_config_cases() + _yaml_cases() + _data_cases() + _adapter_cases() + _model_cases() + _flag_cases()
             + _rundir_cases())
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate case ids: {sorted(dup)}"
    return cases
