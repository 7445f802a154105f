"""Methods compared on the built-in classification task (Wikipedia topics, 11 labels) with MiniLM.

Each configuration runs `deltatune train --set objective=classify` in its own subprocess with the
same data, step budget and evaluation: trainable parameters, mean step time, held-out accuracy and
macro-F1 after the budget, and the first evaluation step at which the held-out accuracy reaches
``--target`` (evaluated every ``--eval-every`` steps). Prints a Markdown table (paste into README.md).

The claims tested in miniature: LoRA ≈ full fine-tuning with ~1 % of the parameters; AdaLoRA ≥ LoRA
at the same (average) rank budget; LoRA+ reaches the target in fewer steps than LoRA; head-only
(feature extraction) is the cheapest and the weakest.

Usage: python benchmarks/compare_classify.py [--runs head,lora_r8,...] [--steps 60] [--out runs/compare_classify]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# name → (method, overrides). Everything else is shared (see common() below).
# One learning rate per run (the new head trains at it too), picked from common practice, not tuned here.
RUNS: dict[str, tuple[str, list[str]]] = {
    "head": ("head", ["train.lr=1e-2"]),
    "partial": ("partial", ["partial.top_n_layers=2", "train.lr=5e-4"]),
    "full": ("full", ["train.lr=1e-4"]),
    "lora_r8": ("lora", ["lora.r=8", "lora.alpha=16", "train.lr=2e-3"]),
    "lora_r16": ("lora", ["lora.r=16", "lora.alpha=32", "train.lr=2e-3"]),
    # AdaLoRA's budget is the *average* final rank: start at 12, prune to 8 (PEFT's init_r/target_r)
    # between step tinit and total − tfinal.
    "adalora_r8": ("adalora", ["adalora.init_r=12", "adalora.target_r=8", "adalora.alpha=16",
                               "adalora.target_modules=all-linear", "adalora.tinit=10", "adalora.tfinal=15",
                               "adalora.delta_t=5", "train.lr=2e-3"]),
    "loraplus_r8": ("lora", ["lora.r=8", "lora.alpha=16", "train.lr=2e-3", "train.loraplus_ratio=16"]),
    "vera": ("vera", ["vera.r=256", "vera.target_modules=all-linear", "train.lr=1e-2"]),
    "bottleneck": ("bottleneck", ["bottleneck.r=16", "train.lr=2e-3"]),
}


def common(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return ["objective=classify", f"model.spec={args.model}", "model.dtype=fp32", "train.bf16=false",
            f"classify.num_train={args.num_train}", f"classify.num_eval={args.num_eval}",
            f"classify.max_length={args.max_length}",
            f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.warmup_ratio=0.06",
            "train.schedule=linear", f"train.eval_every={args.eval_every}", "eval.batch_size=64",
            "eval.before=false", f"output_dir={run_dir}"]


def run_one(name: str, args: argparse.Namespace) -> dict:
    method, sets = RUNS[name]
    run_dir = Path(args.out) / name
    cmd = [sys.executable, "-m", "deltatune.cli", "train", "--no-progress"]
    for s in [f"method={method}", *common(args, run_dir), *sets, *args.extra]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"run": name, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    summary = json.loads((run_dir / "summary.json").read_text())
    reached = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("accuracy") is not None and rec["accuracy"] >= args.target:
            reached = rec["step"]
            break
    after = summary["after"]
    if reached is None and after.get("accuracy", 0) >= args.target:
        reached = summary["steps"]
    return {"run": name, "trainable": summary["trainable_params"], "percent": summary["trainable_percent"],
            "step_s": summary["train_seconds"] / max(1, summary["steps"]), "accuracy": after.get("accuracy"),
            "macro_f1": after.get("macro_f1"), "steps_to_target": reached}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--num-train", type=int, default=960)
    ap.add_argument("--num-eval", type=int, default=300)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per lead section (the topic shows early)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--target", type=float, default=0.6, help="held-out accuracy for 'steps to target'")
    ap.add_argument("--out", default="runs/compare_classify")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    args = ap.parse_args()
    rows = []
    for name in args.runs.split(","):
        row = run_one(name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nbuilt-in topic task (11 labels), {args.model}, {args.num_train} training / {args.num_eval} held-out "
          f"examples ({args.max_length} tokens), {args.steps} steps of {args.batch_size}, evaluated every "
          f"{args.eval_every} steps\n")
    print(f"| run | trainable params | step time | accuracy after {args.steps} steps | macro-F1 | "
          f"steps to {100 * args.target:.0f} % |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | failed: {r['error']} | | | | |")
            continue
        target = str(r["steps_to_target"]) if r["steps_to_target"] is not None else "not reached"
        print(f"| {r['run']} | {r['trainable']:,d} ({r['percent']:.2f} %) | {r['step_s']:.2f} s | "
              f"{100 * r['accuracy']:.1f} % | {r['macro_f1']:.3f} | {target} |")


if __name__ == "__main__":
    main()
