"""One row per method on the built-in task with the default model (issue: method family, item 7).

Each method runs `deltatune train` in its own subprocess (so peak RSS is its own) with the same
data, budget and evaluation: trainable parameters, mean step time relative to LoRA, held-out
exact match after the budget, peak memory. Prints a Markdown table (paste into README.md).

Usage: python benchmarks/compare_methods.py [--methods lora,dora,...] [--num-train 160] [--out runs/compare]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

# Per-method settings; everything else is the built-in default (LoRA r=16 on all linear layers).
SETTINGS: dict[str, list[str]] = {
    "lora": [],
    "dora": [],
    "qlora": [],
    "vera": ["vera.r=256", "vera.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "train.lr=2e-3"],
    "adalora": ["adalora.init_r=16", "adalora.target_r=8", "adalora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "train.lr=1e-3"],
    "bottleneck": ["bottleneck.r=16", "train.lr=1e-3"],
    "prompt_tuning": ["prompt.num_virtual_tokens=20", "train.lr=3e-2"],
    "prefix_tuning": ["prompt.num_virtual_tokens=20", "train.lr=1e-2"],
    "full": ["train.lr=2e-5"],
    "head": ["train.lr=1e-3"],
    "partial": ["partial.top_n_layers=4", "train.lr=1e-4"],
}


def run_one(method: str, out: Path, num_train: int, extra: list[str]) -> dict:
    run_dir = out / method
    sets = [f"method={method}", f"data.num_train={num_train}", f"output_dir={run_dir}", "eval.before=false",
            *SETTINGS[method], *extra]
    cmd = [sys.executable, "-m", "deltatune.cli", "train", "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "method": method,
        "trainable": summary["trainable_params"],
        "step_s": summary["train_seconds"] / max(1, summary["steps"]),
        "em_after": summary["after"].get("exact_match"),
        "peak_mb": summary["peak_memory_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(SETTINGS))
    ap.add_argument("--num-train", type=int, default=160)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for m in args.methods.split(","):
        row = run_one(m, out, args.num_train, args.extra)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["step_s"] for r in rows if r["method"] == "lora" and "step_s" in r), None)
    print(f"\nbuilt-in task, default model, {args.num_train} training examples, 40 held-out\n")
    print("| method | trainable params | step time vs LoRA | exact match after | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} | | | |")
            continue
        rel = f"{r['step_s'] / base:.2f}×" if base else f"{r['step_s']:.2f} s"
        print(f"| {r['method']} | {r['trainable']:,d} | {rel} | {100 * r['em_after']:.0f} % | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
