"""QLoRA cost: step time over LoRA (one process, interleaved) and peak memory (one subprocess each).

1. ``step``: a QLoRA training step (NF4 double-quantized base, fp32 compute, LoRA r=16 on all 7
   projections) over the same LoRA step on the fp32 base, small Llama-shaped model, interleaved
   runs, min of N (process CPU clock, robust on a shared machine).  PEFT + bitsandbytes (CPU
   backend) is timed alongside for information.  Target: QLoRA/LoRA ≤ 1.35.
2. ``memory``: peak RSS of a few training steps (batch 4 × 128 tokens, AdamW, ``labels=input_ids``
   loss: the same plain step for every variant) on the default model (SmolLM2-135M-Instruct), each
   variant in its own subprocess so peaks don't mix.  Variants:
     lora         deltatune method lora on the fp32 model
     qlora        deltatune method qlora: load fp32, quantize, LoRA (the load peak holds the fp32 model)
     qlora_ckpt   deltatune LoRA over a 4-bit checkpoint (``deltatune quantize`` output)
     peft_bnb     transformers BitsAndBytesConfig 4-bit load (CPU) + peft LoRA
   LoRA settings are TrainConfig's (r=16, α=32, dropout 0, all 7 projections), also for PEFT.
   Reported: whole-process peak (ru_maxrss: load + train) and the training-phase peak (VmHWM reset
   after loading), and the RSS of the bare imports.  Target: deltatune QLoRA ≤ 0.8 × PEFT+bnb.

Usage:
  python benchmarks/bench_qlora.py step   [--threads 1] [--repeats 7] [--hidden 576] [--layers 4] [--tokens 512] [--dtype bf16]
  python benchmarks/bench_qlora.py memory [--threads 1] [--steps 3] [--grad-ckpt]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------------
# 1. step time
# ----------------------------------------------------------------------------------------------
def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                       clock: Callable[[], float]) -> dict[str, float]:
    """Min over ``repeats`` rounds; each round runs every fn once, in turn, so drift hits all alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        fn()
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return best


def bench_step(args: argparse.Namespace) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    import deltatune
    from deltatune.quant import quantize_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 3),
                      max_position_embeddings=4096)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = LlamaForCausalLM(cfg).to(dtype)
    ids = torch.randint(0, 2048, (4, args.tokens // 4))
    lcfg = deltatune.LoraConfig(r=16, alpha=32, target_modules=TARGETS)

    def step_fn(model: torch.nn.Module) -> Callable[[], None]:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            # bf16: the base in bf16, LoRA weights fp32 under autocast (as `deltatune train`)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    lora = deltatune.inject(copy.deepcopy(base), lcfg)
    qlora = deltatune.inject(quantize_model(copy.deepcopy(base), compute_dtype=dtype), lcfg)
    for m in (lora, qlora):  # trainable parameters in fp32, as the training loop keeps them
        for p in m.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    fns = {"lora": step_fn(lora), "qlora": step_fn(qlora)}
    if args.peft:
        fns["peft_bnb"] = step_fn(_peft_bnb_from(base, dtype))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"model: Llama hidden={args.hidden} layers={args.layers} (intermediate {cfg.intermediate_size}), "
          f"{args.tokens} tokens/batch, LoRA r=16 on all 7 projections, {args.dtype}, threads={args.threads}, "
          f"min of {args.repeats}, {args.clock} clock")
    t = timeit_interleaved(fns, args.repeats, clock)
    print("train step ms:  " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items()))
    print(f"QLoRA / LoRA step = {t['qlora'] / t['lora']:.3f}   (target ≤ 1.35)")
    if "peft_bnb" in t:
        print(f"PEFT+bitsandbytes QLoRA / LoRA step = {t['peft_bnb'] / t['lora']:.3f};  "
              f"deltatune QLoRA / PEFT+bnb = {t['qlora'] / t['peft_bnb']:.3f}")


def _peft_bnb_from(base: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """PEFT LoRA over a transformers + bitsandbytes 4-bit load of ``base`` (via a temp directory)."""
    import peft
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)  # type: ignore[operator]
        q = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb, device_map="cpu", dtype=dtype)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(q, cfg)


# ----------------------------------------------------------------------------------------------
# 2. peak memory, one subprocess per variant
# ----------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Runs in its own process: load, adapt, train ``args.steps`` steps; returns RSS figures (MiB)."""
    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401  (import cost counted in the baseline, as every variant pays it)

    from deltatune.models import load_model
    from deltatune.registry import apply_method
    from deltatune.train.config import TrainConfig
    from deltatune.train.hooks import RunInfo

    info = RunInfo(total_steps=args.steps, steps_per_epoch=args.steps)
    if variant == "peft_bnb":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    rss_imports = _status_kib("VmRSS")
    t0 = time.perf_counter()
    cfg = TrainConfig()  # lora: r=16, alpha=32, all-linear (the 7 projections), dropout 0
    if variant in ("lora", "qlora"):  # what `deltatune train --set method=...` does after loading
        model, _ = load_model("default", dtype="fp32")
        apply_method(model, dataclasses.replace(cfg, method=variant), info)
    elif variant == "qlora_ckpt":  # QLoRA from a pre-quantized checkpoint: method lora over Linear4bit
        model, _ = load_model(args.ckpt, dtype="fp32")
        apply_method(model, cfg, info)
    elif variant == "peft_bnb":
        import peft
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(args.fp_dir, quantization_config=bnb, device_map="cpu",
                                                     dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                           lora_dropout=0.0))
    else:
        raise ValueError(variant)
    hf: Any = model
    if args.grad_ckpt:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.enable_input_require_grads()
    load_s = time.perf_counter() - t0
    rss_loaded = _status_kib("VmRSS")
    peak_load = _status_kib("VmHWM")
    reset = _reset_peak()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    losses, times = [], []
    for _ in range(args.steps):
        ids = torch.randint(0, 49152, (4, 128), generator=g)
        t1 = time.perf_counter()
        loss = hf(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t1)
        losses.append(round(float(loss), 4))
    mib = 1 / 1024
    return {
        "variant": variant, "rss_imports": rss_imports * mib, "rss_loaded": rss_loaded * mib,
        "peak_load": peak_load * mib, "peak_train": _status_kib("VmHWM") * mib if reset else float("nan"),
        "peak_total": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * mib,
        "trainable": sum(p.numel() for p in params), "load_s": round(load_s, 1),
        "step_s_min": round(min(times), 2), "losses": losses,
    }


def bench_memory(args: argparse.Namespace) -> None:
    from deltatune.models import _gguf_cache_dir, default_model_path, load_model

    load_model("default", dtype="fp32")  # make sure the fp32 HF cache of the default model exists
    fp_dir = _gguf_cache_dir(default_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "smollm2-nf4"
        subprocess.run([sys.executable, "-m", "deltatune.cli", "quantize", "default", "--out", str(ckpt),
                        "--dtype", "fp32"], check=True, stdout=subprocess.DEVNULL)
        rows = []
        for variant in args.variants:
            cmd = [sys.executable, __file__, "_worker", variant, "--threads", str(args.threads), "--steps",
                   str(args.steps), "--ckpt", str(ckpt), "--fp-dir", str(fp_dir)] + (["--grad-ckpt"] if args.grad_ckpt else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"default model SmolLM2-135M-Instruct, fp32, LoRA r=16 α=32 dropout 0 on all 7 projections, batch 4 × 128 tokens, "
          f"{args.steps} AdamW steps, gradient checkpointing {'on' if args.grad_ckpt else 'off'}, "
          f"threads={args.threads}; RSS in MiB, one subprocess per variant")
    print(f"{'variant':<12}{'imports':>9}{'loaded':>9}{'peak load':>11}{'peak train':>12}{'peak total':>12}"
          f"{'step s':>8}  losses")
    for r in rows:
        print(f"{r['variant']:<12}{r['rss_imports']:>9.0f}{r['rss_loaded']:>9.0f}{r['peak_load']:>11.0f}"
              f"{r['peak_train']:>12.0f}{r['peak_total']:>12.0f}{r['step_s_min']:>8.2f}  {r['losses']}")
    by = {r["variant"]: r for r in rows}
    if "peft_bnb" in by:
        ref = by["peft_bnb"]
        for v in ("qlora", "qlora_ckpt", "lora"):
            if v in by:
                print(f"{v} / peft_bnb: peak total {by[v]['peak_total'] / ref['peak_total']:.3f}, "
                      f"peak train {by[v]['peak_train'] / ref['peak_train']:.3f}, "
                      f"above imports {(by[v]['peak_total'] - by[v]['rss_imports']) / (ref['peak_total'] - ref['rss_imports']):.3f}"
                      + ("   (target ≤ 0.8)" if v != "lora" else ""))
    if "lora" in by:
        for v in ("qlora", "qlora_ckpt"):
            if v in by:
                print(f"{v} / lora: peak total {by[v]['peak_total'] / by['lora']['peak_total']:.3f}, "
                      f"peak train {by[v]['peak_train'] / by['lora']['peak_train']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=["all", "step", "memory", "_worker"])
    ap.add_argument("variant", nargs="?", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings on a shared machine)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch (batch 4 × tokens/4)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="step: base and compute dtype (bf16: autocast, fp32 LoRA weights)")
    ap.add_argument("--no-peft", dest="peft", action="store_false", help="step: skip PEFT + bitsandbytes")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--variants", nargs="+", default=["lora", "qlora", "qlora_ckpt", "peft_bnb"])
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--fp-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.what == "_worker":
        print(json.dumps(worker(args.variant, args)))
        return
    if args.what in ("all", "step"):
        bench_step(args)
    if args.what in ("all", "memory"):
        bench_memory(args)


if __name__ == "__main__":
    main()
