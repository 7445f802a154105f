"""``deltatune dreambooth``: a thin front over ``deltatune train`` with ``objective: dreambooth``.

Its flags become config overrides, applied after the YAML file and before ``--set``, so YAML, ``--set``,
``--resume``, progress bars, metrics.jsonl, checkpoints and summary.json work as for any run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["add_parser", "overrides_from_args", "cmd_dreambooth"]


def add_parser(sub: Any) -> None:
    d = sub.add_parser("dreambooth", help="DreamBooth (LoRA or full) on a diffusers Stable Diffusion directory",
                       description="Personalise a text-to-image pipeline from a few images of one subject bound to a "
                                   "rare identifier, with optional prior preservation. A front over 'deltatune train' "
                                   "with objective 'dreambooth' (see its --help for every dreambooth.* key).")
    d.add_argument("config", nargs="?", help="YAML config file (optional; flags override it, --set overrides flags)")
    d.add_argument("--model", help="local diffusers pipeline directory (SD 1.x/2.x layout)")
    d.add_argument("--instance-dir", help="folder of the subject images")
    d.add_argument("--instance-prompt", help="e.g. 'a sks dog'")
    d.add_argument("--class-prompt", help="e.g. 'a dog'")
    d.add_argument("--with-prior-preservation", action="store_true", default=None)
    d.add_argument("--prior-loss-weight", type=float, help="λ (default 1.0)")
    d.add_argument("--num-class-images", type=int, help="class images generated and cached (default 100)")
    d.add_argument("--class-dir", help="class-image cache folder (default: under ~/.cache/deltatune)")
    d.add_argument("--method", choices=["lora", "full"], default=None, help="default lora")
    d.add_argument("--rank", type=int, help="LoRA rank r (alpha = r unless --set lora.alpha=…); default 4")
    d.add_argument("--train-text-encoder", action="store_true", default=None)
    d.add_argument("--max-steps", type=int, help="optimizer steps (default 400)")
    d.add_argument("--lr", type=float, help="peak learning rate (default 1e-4 for LoRA, 1e-6 for full)")
    d.add_argument("--batch-size", type=int, help="(instance, class) pairs per step (default 1)")
    d.add_argument("--resolution", type=int, help="training resolution (default: the pipeline's)")
    d.add_argument("--validation-prompt", action="append", help="a validation-grid prompt (repeatable)")
    d.add_argument("--seed", type=int)
    d.add_argument("--out", help="output directory (the LoRA file lands here)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--resume", action="store_true")
    d.add_argument("--no-progress", action="store_true")


def _kv(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: strings with backslashes/colons survive


def overrides_from_args(args: argparse.Namespace) -> list[str]:
    """The front's defaults, then its flags, as ``key=value`` overrides (``--set`` goes after these)."""
    from . import TEXT_ENCODER_TARGETS, lora_target_regex

    method = args.method or "lora"
    te = bool(args.train_text_encoder)
    out = [_kv("objective", "dreambooth"), _kv("method", method), _kv("eval.exact_match", False),
           _kv("train.schedule", "constant"), _kv("train.bf16", False)]
    if args.config is None:  # the front's own defaults; a YAML file keeps its values
        out += [_kv("train.max_steps", 400), _kv("train.batch_size", 1),
                _kv("train.lr", 1e-4 if method == "lora" else 1e-6), _kv("lora.r", 4), _kv("lora.alpha", 4.0)]
    if args.config is None or args.train_text_encoder is not None:
        regex = lora_target_regex(text_encoder_modules=TEXT_ENCODER_TARGETS if te else None)
        out.append(_kv("lora.target_modules", regex))
    flags: dict[str, Any] = {
        "model.spec": args.model, "dreambooth.instance_dir": args.instance_dir,
        "dreambooth.instance_prompt": args.instance_prompt, "dreambooth.class_prompt": args.class_prompt,
        "dreambooth.with_prior_preservation": args.with_prior_preservation,
        "dreambooth.prior_loss_weight": args.prior_loss_weight, "dreambooth.num_class_images": args.num_class_images,
        "dreambooth.class_dir": args.class_dir, "dreambooth.train_text_encoder": args.train_text_encoder,
        "train.max_steps": args.max_steps, "train.lr": args.lr, "train.batch_size": args.batch_size,
        "dreambooth.resolution": args.resolution, "dreambooth.validation_prompts": args.validation_prompt,
        "train.seed": args.seed, "output_dir": args.out,
        "lora.r": args.rank, "lora.alpha": float(args.rank) if args.rank else None,
    }
    out += [_kv(k, v) for k, v in flags.items() if v is not None]
    return out


def cmd_dreambooth(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..train.config import TrainConfig
    from ..train.loop import run

    overrides = overrides_from_args(args) + list(args.overrides) + (["resume=true"] if args.resume else [])
    cfg = load_config(TrainConfig, args.config, overrides)
    if not cfg.model.spec or cfg.model.spec == "default":
        raise ValueError("deltatune dreambooth needs --model PIPELINE_DIR (a diffusers Stable Diffusion directory)")
    result = run(cfg, progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted; resume with the same command plus --resume --out {result.output_dir}")
        return 130
    s = result.summary
    b, a = s["before"], s["after"]
    print(f"\nrun directory: {result.output_dir}")
    for key in ("eval_instance_loss", "eval_prior_loss"):
        if key in a:
            print(f"{key.removeprefix('eval_').replace('_', ' ')} (fixed noise): {b.get(key, float('nan')):.4f} → {a[key]:.4f}")
    if "grid" in a:
        print(f"validation grid: {result.output_dir / a['grid']}")
    if cfg.method == "lora":
        print(f"LoRA file: {result.output_dir / 'pytorch_lora_weights.safetensors'} "
              "(StableDiffusionPipeline.from_pretrained(base).load_lora_weights(dir))")
    else:
        print(f"pipeline: {result.output_dir / 'pipeline'}")
    print(f"trainable params: {s['trainable_params']:,d} of {s['all_params']:,d}; train {s['train_seconds']:.0f} s; "
          f"peak memory {s['peak_memory_mb']:.0f} MiB")
    return 0
