"""deltatune LoRA vs HF PEFT in one process on a small Llama-shaped model (issue: core library).

Prints, as ratios (interleaved runs, min of N, 1 thread by default):
  train step        deltatune / PEFT                          target ≤ 1.0
  unmerged forward  over the base forward, both libraries     target ≤ PEFT's
  merged forward    over the base forward                     target 1.00 within noise
  dropout 0.05 step over the dropout 0 step, both libraries   target ≤ 1.15

Usage: python benchmarks/bench_lora.py [--threads 1] [--repeats 7] [--hidden 1024] [--tokens 512]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune


def make_model(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg)


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Min over `repeats` rounds; each round runs every fn once, in turn, so drift hits all alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch (batch 4 × tokens/4)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import peft

    base = make_model(args.hidden, args.layers)
    ids = torch.randint(0, 2048, (4, args.tokens // 4))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def ours(dropout: float) -> torch.nn.Module:
        m = copy.deepcopy(base)
        deltatune.inject(m, deltatune.LoraConfig(r=args.rank, alpha=2 * args.rank, dropout=dropout,
                                                 target_modules=targets))
        return m

    def theirs(dropout: float) -> torch.nn.Module:
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=dropout, target_modules=targets)
        return peft.get_peft_model(copy.deepcopy(base), cfg)

    def step_fn(model: torch.nn.Module) -> Callable[[], None]:
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            loss = model(input_ids=ids, labels=ids).logits.float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def fwd_fn(model: torch.nn.Module) -> Callable[[], None]:
        model.eval()

        def fwd() -> None:
            with torch.inference_mode():
                model(input_ids=ids)

        return fwd

    print(f"model: Llama hidden={args.hidden} layers={args.layers}, {args.tokens} tokens/batch, r={args.rank}, "
          f"all 7 projections, threads={args.threads}, min of {args.repeats}")

    # --- training step (dropout 0 and 0.05)
    t = timeit_interleaved({
        "dt": step_fn(ours(0.0)), "peft": step_fn(theirs(0.0)),
        "dt_drop": step_fn(ours(0.05)), "peft_drop": step_fn(theirs(0.05)),
    }, args.repeats)
    print(f"train step        deltatune {t['dt'] * 1e3:8.1f} ms   PEFT {t['peft'] * 1e3:8.1f} ms   "
          f"ratio deltatune/PEFT = {t['dt'] / t['peft']:.3f}  (target ≤ 1.0)")
    print(f"dropout 0.05 step over dropout 0 step: deltatune {t['dt_drop'] / t['dt']:.3f}  "
          f"PEFT {t['peft_drop'] / t['peft']:.3f}  (target ≤ 1.15)")

    # --- forward: base, unmerged, merged
    merged = ours(0.0)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(merged):
            for n in layer.adapters:
                layer.factors(n)[1].normal_(std=0.01)
    unmerged = copy.deepcopy(merged)
    deltatune.merge(merged)
    f = timeit_interleaved({
        "base": fwd_fn(base), "dt": fwd_fn(unmerged), "peft": fwd_fn(theirs(0.0)), "merged": fwd_fn(merged),
    }, args.repeats)
    print(f"unmerged forward over base: deltatune {f['dt'] / f['base']:.3f}  PEFT {f['peft'] / f['base']:.3f}"
          f"  (base {f['base'] * 1e3:.1f} ms; target ≤ PEFT's)")
    print(f"merged forward over base:   deltatune {f['merged'] / f['base']:.3f}  (target 1.00 within noise)")


if __name__ == "__main__":
    main()
