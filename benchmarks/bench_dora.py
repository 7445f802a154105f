"""DoRA step time over LoRA step time, deltatune and HF PEFT, in one process on a small Llama-shaped model.

PEFT's published figure for DoRA is +26 % training time over LoRA (GPU); the target is to be at or
below that ratio, and at or below PEFT's DoRA step time measured here.

Prints (interleaved runs, min of N):
  DoRA / LoRA train step    deltatune and PEFT           target ≤ 1.26
  DoRA step deltatune/PEFT                               target ≤ 1.0
  DoRA unmerged forward over LoRA unmerged forward       for information

Usage: python benchmarks/bench_dora.py [--threads 1] [--repeats 7] [--hidden 576] [--tokens 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_model(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=4096)
    return LlamaForCausalLM(cfg)


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None],
                       clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Min over `repeats` rounds; each round runs every fn once, in turn, so drift hits all alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        fn()
        fn()
    sync()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            sync()
            best[k] = min(best[k], clock() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch (batch 4 × tokens/4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 base weights and autocast (GPU)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="cpu",
                    help="cpu: process CPU time (robust on a shared CPU machine, 1 thread); wall on GPU")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import peft

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
    base = make_model(args.hidden, args.layers).to(device)
    if args.bf16:
        base = base.to(torch.bfloat16)
    ids = torch.randint(0, 2048, (4, args.tokens // 4), device=device)

    def ours(dora: bool) -> torch.nn.Module:
        m = copy.deepcopy(base)
        deltatune.inject(m, deltatune.LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=TARGETS,
                                                 use_dora=dora))
        return m

    def theirs(dora: bool) -> torch.nn.Module:
        cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, use_dora=dora)
        return peft.get_peft_model(copy.deepcopy(base), cfg)

    def step_fn(model: torch.nn.Module) -> Callable[[], None]:
        model.train()
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step() -> None:
            with torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                loss = model(input_ids=ids).logits.float().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def fwd_fn(model: torch.nn.Module) -> Callable[[], None]:
        model.eval()

        def fwd() -> None:
            with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
                model(input_ids=ids)

        return fwd

    print(f"model: Llama hidden={args.hidden} layers={args.layers}, {args.tokens} tokens/batch, r={args.rank}, "
          f"all 7 projections, device={args.device}{' bf16' if args.bf16 else ''}, threads={args.threads}, "
          f"min of {args.repeats}, {args.clock} clock")
    t = timeit_interleaved({
        "dt_lora": step_fn(ours(False)), "dt_dora": step_fn(ours(True)),
        "peft_lora": step_fn(theirs(False)), "peft_dora": step_fn(theirs(True)),
    }, args.repeats, sync, clock)
    print("train step ms:     " + "  ".join(f"{k} {v * 1e3:.1f}" for k, v in t.items()))
    print(f"DoRA/LoRA step:    deltatune {t['dt_dora'] / t['dt_lora']:.3f}   PEFT {t['peft_dora'] / t['peft_lora']:.3f}"
          "   (PEFT's published GPU figure 1.26; target ≤ 1.26)")
    print(f"DoRA step deltatune/PEFT = {t['dt_dora'] / t['peft_dora']:.3f}  (target ≤ 1.0)")
    f = timeit_interleaved({"dt_lora": fwd_fn(ours(False)), "dt_dora": fwd_fn(ours(True)),
                            "peft_dora": fwd_fn(theirs(True))}, args.repeats, sync, clock)
    print(f"DoRA/LoRA forward: deltatune {f['dt_dora'] / f['dt_lora']:.3f}   "
          f"PEFT DoRA / deltatune LoRA {f['peft_dora'] / f['dt_lora']:.3f}")


if __name__ == "__main__":
    main()
