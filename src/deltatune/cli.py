"""``deltatune`` command line: thin — parse, call the library, print.

  deltatune train [CONFIG.yaml] [--set key=value ...] [--resume]
  deltatune generate [--model SPEC] [--adapter DIR] (--prompt TEXT | --messages FILE.json) [sampling]
  deltatune merge --adapter DIR [--model SPEC] --out DIR [--into-4bit [--data FILE]]
  deltatune quantize MODEL --out DIR [--block-size 64] [--no-double-quant] [--skip lm_head ...]
  deltatune eval  --data FILE [--model SPEC] [--adapter DIR]
  deltatune serve [--model SPEC] [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
  deltatune export --format gguf [--model SPEC] [--adapter DIR [--merge]] --out FILE.gguf [--outtype f16]
  deltatune info  DIR   (adapter or model directory)
  deltatune compose --adapter DIR --adapter DIR [...] [--weights 0.7,0.3] [--method NAME] --out DIR
  deltatune dreambooth --model PIPELINE_DIR --instance-dir DIR --instance-prompt "a sks dog" [...] --out DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from .validate import flag

__all__ = ["main", "build_parser"]


def _train_help() -> str:
    from .config import help_text
    from .registry import METHODS, OBJECTIVES
    from .train.config import TrainConfig

    width = max(len(n) for n in [*METHODS, *OBJECTIVES])
    methods = "\n".join(f"  {m.name:<{width}} {m.summary}" for m in METHODS.values())
    objectives = "\n".join(f"  {name:<{width}} {o.summary}" for name, o in OBJECTIVES.items())
    return (
        "Fine-tune a model. With no CONFIG it runs the built-in demo: SmolLM2-135M-Instruct learns to\n"
        "extract fields from sentences as JSON (exact match before/after is printed and saved).\n\n"
        f"Methods (--set method=NAME):\n{methods}\n\nObjectives (--set objective=NAME):\n{objectives}\n\n"
        "Configuration keys (YAML sections or --set section.key=value):\n"
        + help_text(TrainConfig)
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning (LoRA, QLoRA, …).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a model (the built-in demo when no config is given)",
                       description=_train_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set lora.r=8 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output_dir that holds another run (its files are deleted)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = sub.add_parser("generate", help="generate text with a model and optional adapter")
    g.add_argument("--model", default="default", help="'default', an HF model directory or a .gguf file")
    g.add_argument("--adapter", help="adapter directory (PEFT format)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="user message (the chat template is applied)")
    src.add_argument("--messages", help="JSON file with a list of {role, content} messages")
    g.add_argument("--raw", action="store_true", help="treat --prompt as raw text, no chat template")
    g.add_argument("--max-new-tokens", type=flag(int, ge=1), default=128)
    g.add_argument("--temperature", type=flag(float, ge=0), default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=flag(float, gt=0, le=1), default=1.0)
    g.add_argument("--top-k", type=flag(int, ge=0), default=0, help="0 = no top-k filter")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="auto", help="auto/bf16/fp32")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop string: the reply ends before it (repeatable)")

    m = sub.add_parser("merge", help="merge an adapter into its base and write a plain HF model directory")
    m.add_argument("--model", default="default")
    m.add_argument("--adapter", help="adapter directory (PEFT format)")
    m.add_argument("--finetuned", help="with --scale: a fully fine-tuned model directory (θ) to interpolate "
                                       "with --model (θ₀) instead of an adapter")
    m.add_argument("--scale", type=float, default=1.0,
                   help="WiSE-FT α: W₀ + α·ΔW (adapter) or θ₀ + α(θ − θ₀) (--finetuned); 1 = plain merge")
    m.add_argument("--out", required=True, help="new model directory (an earlier merged/model directory is "
                                                "replaced whole; an input or any other existing path is refused)")
    m.add_argument("--dtype", default="auto", help="weights dtype of the merged model (auto/bf16/fp32)")
    m.add_argument("--into-4bit", action="store_true",
                   help="merge into the 4-bit (NF4) base and write a bitsandbytes-layout 4-bit checkpoint; "
                        "prints the error merging adds (max |Δ logit|, perplexity change)")
    m.add_argument("--data", help="with --into-4bit: reference text for the error report (a data file; "
                                  "default: the built-in task's held-out examples)")

    w = sub.add_parser("wise-sweep", help="WiSE-FT: target score vs forgetting for several α in one table")
    w.add_argument("--model", default="default", help="the base model (θ₀)")
    wsrc = w.add_mutually_exclusive_group(required=True)
    wsrc.add_argument("--adapter", help="adapter directory: α scales its ΔW")
    wsrc.add_argument("--finetuned", help="fully fine-tuned model directory: θ₀ + α(θ − θ₀)")
    w.add_argument("--alphas", default="0,0.25,0.5,0.75,1", help="comma-separated α values")
    w.add_argument("--data", help="target evaluation data (a data file; default: the built-in task's held-out set)")
    w.add_argument("--no-generate", action="store_true", help="target loss only (no exact match)")
    w.add_argument("--reference-file", help="forgetting reference text (default: built-in Wikipedia leads)")
    w.add_argument("--max-new-tokens", type=int, default=64)
    w.add_argument("--json", help="also write the rows to this JSON file")

    q = sub.add_parser("quantize", help="write a 4-bit (NF4) checkpoint that transformers + bitsandbytes load")
    q.add_argument("model", help="'default', an HF model directory or a .gguf file")
    q.add_argument("--out", required=True)
    q.add_argument("--block-size", type=flag(int, ge=1), default=64, help="weights per absmax block")
    q.add_argument("--no-double-quant", action="store_true", help="keep absmax in fp32 (4.5 instead of 4.127 bits)")
    q.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"])
    q.add_argument("--skip", nargs="*", default=["lm_head"], metavar="NAME",
                   help="modules kept in full precision (exact name or dotted suffix; default lm_head; "
                        "--skip alone quantizes every linear)")
    q.add_argument("--dtype", default="auto", help="load dtype = dtype of the kept weights (auto/bf16/fp32)")
    q.add_argument("--compute-dtype", default="auto", help="bnb_4bit_compute_dtype written to the config")

    e = sub.add_parser("eval", help="loss/perplexity and exact match on a data file (a classifier: accuracy, "
                                    "macro-F1, confusion matrix)")
    e.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet in text/alpaca/chat/sharegpt shape")
    e.add_argument("--model", default="default")
    e.add_argument("--adapter")
    e.add_argument("--format", default="auto")
    # Defaults: EvalConfig's and DataConfig's (what `deltatune train` evaluates with), shown in --help.
    e.add_argument("--max-length", type=flag(int, ge=8), default=None, help="tokens per example (default: data.max_length)")
    e.add_argument("--max-new-tokens", type=flag(int, ge=1), default=None, help="default: eval.max_new_tokens")
    e.add_argument("--batch-size", type=flag(int, ge=1), default=None, help="default: eval.batch_size")
    e.add_argument("--no-generate", action="store_true", help="loss/perplexity only")
    e.add_argument("--text-field", default="text", help="classifier data: the text column")
    e.add_argument("--label-field", default="label", help="classifier data: the label column")
    e.add_argument("--text-pair-field", help="classifier data: a second text column (sentence pairs)")

    s = sub.add_parser("serve", help="serve a base model and LoRA adapters behind an OpenAI-compatible HTTP API")
    s.add_argument("--model", default="default", help="'default', an HF model directory or a .gguf file")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve the adapter in DIR as model NAME (repeatable)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $DELTATUNE_API_KEY)")
    s.add_argument("--max-batch-size", type=int, default=8, help="rows decoded together")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    s.add_argument("--adapter-root", default=None,
                   help="enable POST /v1/load_lora_adapter for adapters under this directory")
    s.add_argument("--max-tokens", type=int, default=1024, help="cap on (and default for) a request's max_tokens")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--dtype", default="auto")

    x = sub.add_parser("export", help="export a model or an adapter for another runtime (GGUF: llama.cpp)")
    x.add_argument("--format", required=True, choices=["gguf"])
    x.add_argument("--model", default="default", help="the base: 'default', an HF model directory or a .gguf file")
    x.add_argument("--adapter", help="a LoRA adapter directory: written as a GGUF adapter file (or merged with --merge)")
    x.add_argument("--merge", action="store_true", help="merge --adapter into the base and write the whole model")
    x.add_argument("--out", required=True, help="the .gguf file to write")
    x.add_argument("--outtype", default=None, choices=["f32", "f16", "q8_0"],
                   help="tensor type (model default f16; adapters f32 or f16, default f32)")

    i = sub.add_parser("info", help="what an adapter or model directory holds (bytes by storage type)")
    i.add_argument("path")

    from .compose.cli import add_parser as add_compose_parser
    from .diffusion.command import add_parser as add_dreambooth_parser

    add_compose_parser(sub)
    add_dreambooth_parser(sub)
    return p


def _load(model_spec: str, adapter: str | None, dtype: str = "auto") -> tuple[Any, Any]:
    from . import load_adapter
    from .models import load_model

    model, tok = load_model(model_spec, dtype=dtype)
    if adapter:
        load_adapter(model, adapter)
    return model, tok


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train.config import TrainConfig
    from .train.loop import run

    overrides = (list(args.overrides) + (["resume=true"] if args.resume else [])
                 + (["overwrite=true"] if args.overwrite else []))
    cfg = load_config(TrainConfig, args.config, overrides)
    result = run(cfg, progress=not args.no_progress)
    from .train.distributed import is_main_process

    if not is_main_process():  # under torchrun rank 0 alone reports
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted; resume with: deltatune train {args.config or ''} --resume "
              f"--set output_dir={result.output_dir}".replace("  ", " "))
        return 130
    s = result.summary
    b, a = s["before"], s["after"]
    print(f"\nrun directory: {result.output_dir}")
    def pct(d: dict[str, Any]) -> str:
        return f"{100 * d['exact_match']:.1f}%" if "exact_match" in d else "—"

    def loss(d: dict[str, Any]) -> str:
        return f"{d['eval_loss']:.4f}" if "eval_loss" in d else "—"

    if "exact_match" in a:
        print(f"exact match on {s['data']['eval_rows']} held-out examples: {pct(b)} before → {pct(a)} after")
    if "accuracy" in a:
        def acc(d: dict[str, Any]) -> str:
            return f"{100 * d['accuracy']:.1f}% (macro-F1 {d['macro_f1']:.3f})" if "accuracy" in d else "—"

        print(f"accuracy on {s['data']['eval_rows']} held-out examples: {acc(b)} before → {acc(a)} after")
    if "eval_loss" in a:
        print(f"held-out loss: {loss(b)} → {loss(a)}")
    print(f"trainable params: {s['trainable_params']:,d} of {s['all_params']:,d} ({s['trainable_percent']:.3f}%)  "
          f"train {s['train_seconds']:.0f} s at {s['tokens_per_s']:.0f} tok/s; total {s['wall_seconds']:.0f} s; "
          f"peak memory {s['peak_memory_mb']:.0f} MiB")
    from .train.forgetting import summary_lines

    for line in summary_lines(s.get("forgetting", {})):
        print(line)
    for ex in a.get("examples", [])[:2]:
        print(f"  reference:  {ex['reference']}\n  prediction: {ex['prediction']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import (
        Row,
        SamplingParams,
        TextTracker,
        encode_prompt,
        generate_ids,
        pad_token_id,
        stop_token_ids,
    )

    model, tok = _load(args.model, args.adapter, args.dtype)
    if args.adapter:
        from . import merge

        merge(model)  # merged decoding costs what the base costs
    if args.messages:
        ids = encode_prompt(tok, _read_messages(Path(args.messages)))
    elif args.raw:
        ids = list(tok(args.prompt, add_special_tokens=False)["input_ids"])
    else:
        ids = encode_prompt(tok, [{"role": "user", "content": args.prompt}])
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    row = Row(ids, params, text=TextTracker(tok, params.stop))
    generate_ids(model, [row], stop_ids=stop_token_ids(tok, model), pad_id=pad_token_id(tok))
    assert row.text is not None
    print(row.text.text.strip())
    return 0


def _read_messages(path: Path) -> list[dict[str, str]]:
    """``--messages FILE``: a JSON list of {role, content}; every problem names the file."""
    try:
        messages = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"--messages {path}: file not found") from None
    except IsADirectoryError:
        raise ValueError(f"--messages {path}: is a directory; expected a JSON file") from None
    except UnicodeDecodeError:
        raise ValueError(f"--messages {path}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--messages {path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    ok = isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise ValueError(f"--messages {path}: expected a non-empty JSON list of {{\"role\": ..., \"content\": ...}} "
                         "objects with string values")
    return messages  # type: ignore[no-any-return]


def _output_checks(args: argparse.Namespace, *inputs: tuple[str, str | None]) -> None:
    """Refuse --out naming an input, before any model is loaded (the one input-overwrite rule)."""
    from .fsutil import refuse_input

    model = None if args.model == "default" else args.model
    refuse_input(args.out, [("base model", model), *inputs])


def _is_model_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and not (p / "adapter_config.json").is_file()


def cmd_merge(args: argparse.Namespace) -> int:
    from . import unload
    from .fsutil import atomic_dir, check_output

    if (args.adapter is None) == (args.finetuned is None) or (args.finetuned is not None and args.into_4bit):
        print("deltatune merge: error: the following arguments are required: --adapter (or --finetuned DIR with "
              "--scale, without --into-4bit)", file=sys.stderr)
        return 2
    _output_checks(args, ("adapter", args.adapter), ("reference data", getattr(args, "data", None)))
    out = Path(args.out)
    check_output(out, replaceable=_is_model_dir, what="merged model directory")  # before the (slow) load
    if args.into_4bit:
        return _merge_into_4bit(args)
    if args.finetuned is not None:
        from .wise import interpolate

        base, _ = _load(args.model, None, args.dtype)
        plain: Any
        plain, tok = _load(args.finetuned, None, args.dtype)
        interpolate(plain, base.state_dict(), args.scale)
    elif args.scale != 1.0:
        from .wise import merge_scaled

        model, tok = _load(args.model, args.adapter, args.dtype)
        plain = merge_scaled(model, args.scale)
    else:
        model, tok = _load(args.model, args.adapter, args.dtype)
        plain = unload(model)
    with atomic_dir(out, replaceable=_is_model_dir, what="merged model directory") as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    print(f"merged model written to {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _merge_into_4bit(args: argparse.Namespace) -> int:
    import copy
    import warnings

    from . import load_adapter
    from .data import reference_batches
    from .models import resolve_dtype
    from .quant.linear4bit import Linear4bit, quantize_model
    from .quant.merge import format_merge_report, merge_into_4bit_checkpoint

    model, tok = _load(args.model, None, args.dtype)
    base16 = None
    if not any(isinstance(m, Linear4bit) for m in model.modules()):  # a 16-bit base: quantize as method qlora does
        base16 = model
        model = quantize_model(copy.deepcopy(base16), compute_dtype=resolve_dtype(args.dtype))
        with warnings.catch_warnings():  # a QLoRA adapter's base checksums are of the 4-bit weights
            warnings.simplefilter("ignore")
            load_adapter(base16, args.adapter)
    load_adapter(model, args.adapter)
    report = merge_into_4bit_checkpoint(model, tok, args.out, reference_batches(tok, args.data), base16)
    print("\n".join(format_merge_report(report)))
    print(f"merged 4-bit model written to {args.out} (report in merge_report.json; loads with "
          "transformers + bitsandbytes, or deltatune --model)")
    return 0


def cmd_wise_sweep(args: argparse.Namespace) -> int:
    from .wise import format_sweep, sweep_cli

    rows = sweep_cli(args)
    print("\n".join(format_sweep(rows)))
    if args.json:
        from .io import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode())
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .fsutil import check_output, refuse_input
    from .models import load_model, resolve_dtype
    from .quant.checkpoint import describe_checkpoint, save_4bit_checkpoint
    from .quant.linear4bit import quantize_model

    refuse_input(args.out, [("model", None if args.model == "default" else args.model)])
    check_output(args.out, replaceable=lambda p: (p / "config.json").is_file(), what="model directory")
    model, tok = load_model(args.model, dtype=args.dtype)
    quantize_model(model, args.block_size, not args.no_double_quant, resolve_dtype(args.compute_dtype),
                   args.skip, args.quant_type)
    out = save_4bit_checkpoint(model, tok, args.out)
    print("\n".join(describe_checkpoint(out)))
    print(f"4-bit model written to {out} (transformers + bitsandbytes load it; deltatune --model {out} too)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .classifier import is_classifier

    if is_classifier(args.model, args.adapter):
        return _eval_classifier(args)
    from .data import load_examples, prompt_and_reference, tokenize_examples
    from .generate import generate_texts
    from .objectives.causal_lm import eval_loss
    from .tasks import score_exact_match
    from .train.config import DataConfig, EvalConfig
    from .train.runtime import Runtime

    ecfg, dcfg = EvalConfig(), DataConfig()
    batch_size = args.batch_size or ecfg.batch_size
    model, tok = _load(args.model, args.adapter)
    if args.adapter:
        from . import merge

        merge(model)
    loaded = load_examples(args.data, args.format)
    dropped: list[str] = []
    max_length = args.max_length or dcfg.max_length
    rows, _, n_dropped = tokenize_examples(loaded.examples, tok, max_length, dcfg.completion_only_loss, dropped)
    if not rows:  # a loss over 0 tokens is no score (it printed loss 0.0, perplexity 1.0)
        raise ValueError(f"{args.data}: no example has a loss token within --max-length {max_length} "
                         f"({n_dropped} of {len(loaded.examples)} dropped, e.g. {', '.join(dropped[:3])}): "
                         "raise --max-length")
    if n_dropped:
        logging.getLogger("deltatune").warning("%d example(s) dropped (no loss token within --max-length %d), "
                                               "e.g. %s", n_dropped, max_length, ", ".join(dropped[:3]))
    rt = Runtime(next(model.parameters()).device, bf16=False)
    res: dict[str, Any] = {"examples": len(loaded.examples)}
    res.update(eval_loss(model, rows, int(tok.pad_token_id), batch_size, rt))
    pairs = [p for p in map(prompt_and_reference, loaded.examples) if p is not None]
    if pairs and not args.no_generate:
        preds = generate_texts(model, tok, [p for p, _ in pairs], max_new_tokens=args.max_new_tokens or ecfg.max_new_tokens,
                               batch_size=batch_size)
        res["exact_match"] = score_exact_match(preds, [r for _, r in pairs])
    from .fsutil import dumps_json

    print(dumps_json(res, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .models import load_model
    from .serve import base_model_name, build_server, parse_adapter_args

    adapters = parse_adapter_args(args.adapter)
    model, tok = load_model(args.model, dtype=args.dtype)
    server = build_server(model, tok, base_name=base_model_name(args.model, model), adapters=adapters,
                          host=args.host, port=args.port, api_key=args.api_key or os.environ.get("DELTATUNE_API_KEY"),
                          max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          adapter_root=args.adapter_root, max_tokens=args.max_tokens,
                          max_body_bytes=args.max_body_bytes)
    names = ", ".join([server.engine.base_name, *adapters])
    print(f"serving {names} on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    server.run()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.gguf import export_adapter_gguf, export_model_gguf
    from .fsutil import refuse_input

    out = Path(args.out)
    refuse_input(out, [("base model", None if args.model == "default" else args.model), ("adapter", args.adapter)])
    if out.is_dir():
        raise ValueError(f"--out {out}: is a directory; --format gguf writes one .gguf file")
    if args.adapter and not args.merge:
        from transformers import AutoConfig

        from .models import load_model

        if (Path(args.model) / "config.json").is_file():
            config = AutoConfig.from_pretrained(args.model)
        else:  # 'default' or a .gguf file: the config comes with the model
            config = load_model(args.model, dtype="fp32")[0].config
        export_adapter_gguf(args.adapter, config, out, args.outtype or "f32")
        print(f"GGUF LoRA adapter written to {out} (llama.cpp: llama-cli -m BASE.gguf --lora {out})")
        return 0
    from . import load_adapter, unload
    from .models import load_model

    model, tok = load_model(args.model, dtype="fp32")  # merge in fp32; the file's type is --outtype
    plain: Any = model
    if args.adapter:
        load_adapter(model, args.adapter)
        plain = unload(model)
    export_model_gguf(plain, tok, out, args.outtype or "f16")
    print(f"GGUF model written to {out} ({args.outtype or 'f16'}; llama.cpp and transformers' gguf_file= read it)")
    return 0


def _eval_classifier(args: argparse.Namespace) -> int:
    from .classifier import evaluate_file
    from .data.labelled import ClassifyConfig
    from .train.config import EvalConfig

    # Defaults are the config's: classify.max_length, eval.batch_size.
    fields = ClassifyConfig(text_field=args.text_field, label_field=args.label_field,
                            text_pair_field=args.text_pair_field, max_length=args.max_length or ClassifyConfig().max_length)
    res = evaluate_file(args.model, args.adapter, args.data, fields, args.batch_size or EvalConfig().batch_size)
    print(json.dumps(res, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .io import read_adapter_info

    if (Path(args.path) / "config.json").is_file() and not (Path(args.path) / "adapter_config.json").is_file():
        from .quant.checkpoint import describe_checkpoint

        print("\n".join(describe_checkpoint(args.path)))
        return 0
    from .registry import kind_for_peft_type

    f = read_adapter_info(args.path)
    cfg = f.config
    kind = kind_for_peft_type(str(cfg.get("peft_type", "LORA")), f.directory)
    head, *modules = kind.describe(f)
    total = sum(t.numel() for t in f.tensors.values())
    print(f"adapter: {f.directory}")
    print(head)
    print(f"base: {cfg.get('base_model_name_or_path')}")
    if f.fingerprint:
        checked = f.fingerprint.get("modules") or f.fingerprint.get("blocks") or {}
        print(f"base fingerprint: {f.fingerprint.get('architecture')} ({f.fingerprint.get('model_type')}), "
              f"{len(checked)} base modules with shapes/checksums")
    print(f"tensors: {len(f.tensors)}, parameters: {total:,d}, modules_to_save: {cfg.get('modules_to_save')}")
    print("\n".join(modules))
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from .compose.cli import cmd_compose as run

    return run(args)


def cmd_dreambooth(args: argparse.Namespace) -> int:
    from .diffusion.command import cmd_dreambooth as run

    return run(args)


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "merge": cmd_merge, "wise-sweep": cmd_wise_sweep,
            "eval": cmd_eval, "info": cmd_info,
            "quantize": cmd_quantize, "compose": cmd_compose, "serve": cmd_serve,
            "export": cmd_export, "dreambooth": cmd_dreambooth}


# Import-time messages of libraries that transformers pulls in when they happen to be installed, which
# a deltatune user can neither act on nor avoid: torchao (imported by transformers' quantizer table)
# logs that its optional CUDA/mxfp8 extensions and triton are missing, and registers Enums with
# torch's pytree, which logs a deprecation. Their own errors still show; `-v` shows everything.
_IMPORT_NOISE_LOGGERS = ("torchao", "torch.utils._pytree")


def _quiet_third_party() -> None:
    for name in _IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:
        _quiet_third_party()
    try:
        code = COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as e:
        if args.verbose:
            raise
        # An OSError carries (strerror, filename): print '<path>: <reason>', not '[Errno 28] ...'.
        text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        print(f"deltatune {args.command}:{_rank_tag()} error: {text}", file=sys.stderr)
        return 2
    _leave_process_group()
    return code


def _rank_tag() -> str:
    """' [rank N]' under torchrun (which rank failed), else ''."""
    import os

    return f" [rank {os.environ['RANK']}]" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else ""


def _leave_process_group() -> None:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
