"""Training throughput: `deltatune train` vs HF PEFT + a plain PyTorch loop, same model, data, settings.

Both sides train LoRA (r=16, alpha=32, all linear layers, dropout 0) on the built-in task with the
same batches (deltatune's deterministic order), AdamW at the same lr, clipping at 1.0, in the same
process; rounds alternate (deltatune, PEFT, deltatune, PEFT, …) and the best round of each counts.
tokens/s counts input tokens (attention mask), as `deltatune train` reports them.

Usage: python benchmarks/bench_train.py [--model default] [--steps 6] [--rounds 2] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from deltatune.config import from_dict
from deltatune.data import collate, epoch_batches, prepare_data
from deltatune.models import load_model
from deltatune.train.config import TrainConfig
from deltatune.train.loop import run


def peft_round(base: torch.nn.Module, rows: list, pad: int, steps: int, batch_size: int, lr: float) -> float:
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches = epoch_batches(len(rows), batch_size, 0, 0)[:steps]
    tokens = 0
    t0 = time.perf_counter()
    for idx in batches:
        b = collate([rows[i] for i in idx], pad)
        # The standard HF/PEFT recipe: full logits, the model's own (mean) loss.
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(b["attention_mask"].sum())
    return tokens / (time.perf_counter() - t0)


def deltatune_round(base: torch.nn.Module, tok: object, steps: int, batch_size: int, lr: float,
                    spec: str) -> float:
    with tempfile.TemporaryDirectory() as d:
        cfg = from_dict(TrainConfig, {
            "model": {"spec": spec}, "data": {"num_eval": 0},
            "train": {"max_steps": steps, "batch_size": batch_size, "lr": lr},
            "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
            "eval": {"exact_match": False}, "output_dir": d,
        })
        res = run(cfg, model=copy.deepcopy(base), tokenizer=tok, progress=False)
        return float(res.summary["tokens_per_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    args = ap.parse_args()
    base, tok = load_model(args.model)
    data = prepare_data(TrainConfig().data, tok)
    dt, pf = 0.0, 0.0
    for r in range(args.rounds):
        dt = max(dt, deltatune_round(base, tok, args.steps, args.batch_size, args.lr, args.model))
        pf = max(pf, peft_round(base, data.train, int(tok.pad_token_id), args.steps, args.batch_size, args.lr))
        print(f"round {r + 1}: deltatune {dt:.0f} tok/s, PEFT+loop {pf:.0f} tok/s (best so far)")
    dtype = next(base.parameters()).dtype
    print(f"model {args.model} ({dtype}), {args.steps} steps × batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"tokens/s: deltatune {dt:.0f}  PEFT+plain loop {pf:.0f}  ratio deltatune/PEFT = {dt / pf:.3f}  (target ≥ 1.0)")


if __name__ == "__main__":
    main()
