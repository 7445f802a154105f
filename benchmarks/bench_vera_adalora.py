"""Training-step time of VeRA and AdaLoRA over LoRA, deltatune and HF PEFT in one process.

PEFT's MetaMathQA method comparison (GPU, Llama-3.2-3B) trains q_proj/v_proj with LoRA r=32,
VeRA r=256 and AdaLoRA init_r=64 → target_r=32; its published step times are VeRA +7 % and AdaLoRA
+24 % over LoRA. Same settings here on a small Llama-shaped model (random weights). A step is
forward + backward + AdamW + the method's per-step work: AdaLoRA's orthogonality regulariser and
its rank allocator (importance EMAs + global masking every step: delta_t = 1, in the pruning phase).

Prints each method's step time over LoRA's, for deltatune and for PEFT (interleaved runs, min of N;
process CPU time by default, which other jobs on a shared machine disturb far less than wall time).

Usage: python benchmarks/bench_vera_adalora.py [--threads 1] [--repeats 7] [--hidden 576] [--layers 4] [--tokens 512]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune
from deltatune.methods.adalora import AdaLoraConfig, inject_adalora
from deltatune.methods.vera import VeraConfig, inject_vera

TARGETS = ["q_proj", "v_proj"]
ADALORA = dict(init_r=64, target_r=32, tinit=200, tfinal=500, total_step=5000)


def make_model(hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 192), max_position_embeddings=2048)
    return LlamaForCausalLM(cfg)


def timeit_interleaved(fns: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Min over `repeats` rounds; each round runs every fn once, in turn, so drift hits all alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            best[k] = min(best[k], clock() - t0)
    return best


def step_fn(model: Any, ids: torch.Tensor, peft_adalora: bool = False) -> Callable[[], None]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = [ADALORA["tinit"] + 1]  # inside the pruning phase: a budget and a global mask every step

    def run() -> None:
        loss = model(input_ids=ids, labels=ids).loss  # PEFT's AdaLoRA adds its regulariser here
        extra = getattr(model, "deltatune_extra_loss", None)
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        opt.step()
        if peft_adalora:
            model.base_model.update_and_allocate(step[0])  # PEFT: after step, before zero_grad
        opt.zero_grad(set_to_none=True)
        after = getattr(model, "deltatune_after_step", None)
        if after is not None:
            after(step[0])  # deltatune's loop: after zero_grad
        step[0] += 1

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per batch (batch 4 × tokens/4)")
    ap.add_argument("--no-peft", action="store_true", help="deltatune only")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: process CPU time (robust on a shared machine with --threads 1); wall: perf_counter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = make_model(args.hidden, args.layers)
    ids = torch.randint(0, 2048, (4, args.tokens // 4))

    fns: dict[str, Callable[[], None]] = {
        "dt_lora": step_fn(deltatune.inject(copy.deepcopy(base), deltatune.LoraConfig(r=32, alpha=64, target_modules=TARGETS)), ids),
        "dt_vera": step_fn(inject_vera(copy.deepcopy(base), VeraConfig(r=256, target_modules=TARGETS)), ids),
        "dt_adalora": step_fn(inject_adalora(copy.deepcopy(base), AdaLoraConfig(target_modules=TARGETS, **ADALORA)), ids),
    }
    if not args.no_peft:
        import peft

        def theirs(cfg: Any) -> Any:
            return peft.get_peft_model(copy.deepcopy(base), cfg)

        fns["peft_lora"] = step_fn(theirs(peft.LoraConfig(r=32, lora_alpha=64, target_modules=TARGETS)), ids)
        fns["peft_vera"] = step_fn(theirs(peft.VeraConfig(r=256, target_modules=TARGETS)), ids)
        ada = peft.AdaLoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **ADALORA)
        fns["peft_adalora"] = step_fn(theirs(ada), ids, peft_adalora=True)

    print(f"model: Llama hidden={args.hidden} layers={args.layers}, {args.tokens} tokens/batch, targets q_proj/v_proj, "
          f"threads={args.threads}, min of {args.repeats} ({args.clock} time)")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t = timeit_interleaved(fns, args.repeats, clock)
    for lib in ("dt", "peft"):
        if f"{lib}_lora" not in t:
            continue
        name = "deltatune" if lib == "dt" else "PEFT     "
        lora = t[f"{lib}_lora"]
        print(f"{name}  LoRA r=32 {lora * 1e3:7.1f} ms | VeRA r=256 {t[f'{lib}_vera'] * 1e3:7.1f} ms "
              f"({t[f'{lib}_vera'] / lora - 1:+.1%}) | AdaLoRA 64→32 {t[f'{lib}_adalora'] * 1e3:7.1f} ms "
              f"({t[f'{lib}_adalora'] / lora - 1:+.1%})")
    print("PEFT's published GPU figures (3B model): VeRA +7 %, AdaLoRA +24 % over LoRA")


if __name__ == "__main__":
    main()
