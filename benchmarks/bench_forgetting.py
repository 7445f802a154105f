"""Learning vs forgetting on the real default model (issue #12; "LoRA Learns Less and Forgets Less" in miniature).

Target task: the built-in JSON-extraction task (``deltatune train`` defaults). For each
configuration one ``deltatune train`` subprocess (own peak RSS) reports, from its summary.json:

* target score: exact match on the held-out examples (and the held-out loss);
* forgetting: reference-set loss increase and KL(p_base ‖ p_adapted) (mean over reference tokens;
  built-in Wikipedia lead sections) from the run's ``forgetting`` section;
* old task: the loss increase on a second task the base model already does, Wikipedia
  (title → one-line description) questions built here from the same package (articles outside
  the reference slice), via ``forgetting.old_task_file``;
* cost: seconds per step, and for EWC the Fisher estimation time (step cost ratio vs the plain run).

WiSE-FT rows interpolate the full run's weights with the base, θ₀ + α(θ − θ₀), and are scored
the same way in this process (``deltatune.wise.sweep``). A scatter of target score vs reference
loss increase is written to ``<out>/forgetting.png``; the Markdown table to stdout and
``<out>/table.md``. ``--mixed-cost`` also times a training step with a mixed two-adapter batch
(per-row routing) against one adapter.

Full run, the README's table (about 90 min on a 2-core AMD EPYC shared with other jobs; a full
fine-tuning run alone took ~4 min there when the machine was idle; ``--reuse`` keeps finished runs):
    python benchmarks/bench_forgetting.py --out runs/bench_forgetting --mixed-cost --ewc-full 1e3,1e4 --ewc-lora 1e4
Reduced run (what the README reports when marked so):
    python benchmarks/bench_forgetting.py --quick --out runs/bench_forgetting_quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# name → overrides. Full fine-tuning at lr 1e-4 (5× the README's 2e-5) so that it forgets visibly.
CONFIGS: dict[str, list[str]] = {
    "full": ["method=full", "train.lr=1e-4"],
    "full lr=5e-4": ["method=full", "train.lr=5e-4"],  # 5× more: what a too-large step forgets
    "full+EWC": ["method=full", "train.lr=1e-4", "regularize.ewc.weight={ewc_full}", "regularize.ewc.samples={fisher}"],
    "full+replay": ["method=full", "train.lr=1e-4", "data.replay_file={replay}", "data.replay_ratio=0.25"],
    "partial (top 4)": ["method=partial", "partial.top_n_layers=4", "train.lr=1e-4"],
    "LoRA r=16": ["method=lora", "lora.r=16", "lora.alpha=32"],
    "LoRA r=64": ["method=lora", "lora.r=64", "lora.alpha=128"],
    "LoRA r=256": ["method=lora", "lora.r=256", "lora.alpha=512"],
    "LoRA+EWC": ["method=lora", "regularize.ewc.weight={ewc_lora}", "regularize.ewc.samples={fisher}"],
    "LoRA+KL": ["method=lora", "regularize.kl.weight={kl}"],
}
QUICK = ["full", "full+EWC", "full+replay", "LoRA r=16", "LoRA+EWC", "LoRA+KL"]
ALPHAS = (0.25, 0.5, 0.75)


def _wiki_items() -> list[tuple[str, dict[str, Any]]]:
    from deltatune.train.reference import wiki_summaries_path

    data = json.loads(wiki_summaries_path().read_text())
    return sorted(data.items(), key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())


def write_side_data(out: Path, n_old: int, n_replay: int) -> tuple[Path, Path]:
    """Old task (title → description, chat) and replay text, from the end of the hash order (the
    reference slice is taken from its start)."""
    items = [(t, r) for t, r in _wiki_items() if r.get("description") and r.get("extract")]
    old = [{"messages": [{"role": "user", "content": f"In a few words, what is {t}?"},
                         {"role": "assistant", "content": r["description"]}]} for t, r in items[-n_old:]]
    replay = [{"text": r["extract"]} for _, r in items[-(n_old + n_replay):-n_old]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "old_task.jsonl").write_text("\n".join(json.dumps(x) for x in old) + "\n")
    (out / "replay.jsonl").write_text("\n".join(json.dumps(x) for x in replay) + "\n")
    return out / "old_task.jsonl", out / "replay.jsonl"


def run_one(name: str, sets: list[str], out: Path, common: list[str], reuse: bool = False) -> dict[str, Any]:
    run_dir = out / re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("λ", "lambda")).strip("_")
    cmd = [sys.executable, "-m", "deltatune.cli", "train", "--no-progress"]
    for s in [*common, *sets, f"output_dir={run_dir}"]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    if reuse and _same_run(run_dir, cmd):
        print(f"[{name}] reusing {run_dir}", file=sys.stderr)
    else:
        proc = subprocess.run(cmd + (["--overwrite"] if run_dir.exists() else []), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            print(f"[{name}] failed: {' | '.join(tail)}", file=sys.stderr)
            return {"name": name, "error": tail[-1] if tail else "failed"}
        (run_dir / "bench_command.json").write_text(json.dumps(cmd[1:]))
    s = json.loads((run_dir / "summary.json").read_text())
    f = s["forgetting"]
    row = {"name": name, "dir": str(run_dir), "target_em": s["after"].get("exact_match"),
           "target_loss": s["after"].get("eval_loss"), "ref_loss_increase": f.get("loss_increase"),
           "kl_mean": f.get("kl_base_to_adapted_mean"), "kl_mode": (f.get("kl_mode") or "").split(" ")[0],  # "exact" or "top-256"
           "old_task_increase": f.get("old_task", {}).get("loss_increase"),
           "step_s": s["train_seconds"] / max(1, s["steps"]), "trainable": s["trainable_params"],
           "wall_s": round(time.perf_counter() - t0, 1)}
    if "ewc" in s.get("regularize", {}):
        row["fisher_s"] = s["regularize"]["ewc"]["fisher_seconds"]
    print(f"[{name}] {json.dumps({k: v for k, v in row.items() if k != 'dir'})}", file=sys.stderr)
    return row


def _same_run(run_dir: Path, cmd: list[str]) -> bool:
    """``--reuse``: the directory holds a finished run of exactly this command."""
    done = run_dir / "summary.json"
    rec = run_dir / "bench_command.json"
    return done.is_file() and rec.is_file() and json.loads(rec.read_text()) == cmd[1:]


def wise_rows(full_dir: Path, old_task: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """WiSE-FT of the full run: θ₀ + α(θ − θ₀), target EM/loss, reference and old-task forgetting."""
    import torch

    from deltatune.models import load_model
    from deltatune.objectives.causal_lm import eval_loss
    from deltatune.tasks import make_task, score_exact_match
    from deltatune.train.data import (
        examples_from_records,
        load_examples,
        prompt_and_reference,
        tokenize_examples,
    )
    from deltatune.train.evaluate import generate_texts
    from deltatune.train.forgetting import ForgettingConfig, cache_base, cached_measure
    from deltatune.train.reference import reference_rows
    from deltatune.train.runtime import Runtime
    from deltatune.wise import interpolated

    base, tok = load_model("default", dtype="fp32")
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    del base
    model, _ = load_model(str(full_dir / "model"), dtype="fp32")
    _, recs = make_task(args.num_train, args.num_eval, 0)
    ex = examples_from_records([(f"eval {i}", r) for i, r in enumerate(recs)], "chat").examples
    rows, _, _ = tokenize_examples(ex, tok, 1024)
    pairs = [p for p in map(prompt_and_reference, ex) if p is not None]
    old_rows, _, _ = tokenize_examples(load_examples(old_task).examples, tok, 1024)
    ref = reference_rows(ForgettingConfig(max_tokens=args.ref_tokens), tok)
    rt = Runtime(torch.device("cpu"), False)
    pad = int(tok.pad_token_id)
    with interpolated(model, base_state, 0.0):
        ref_cache, old_cache = cache_base(model, ref, pad, 256), cache_base(model, old_rows, pad, 256)
    out = []
    for a in ALPHAS:
        with interpolated(model, base_state, a):
            preds = generate_texts(model, tok, [p for p, _ in pairs], max_new_tokens=64, batch_size=40)
            m = cached_measure(model, ref, ref_cache, pad)
            o = cached_measure(model, old_rows, old_cache, pad)
            out.append({"name": f"WiSE-FT α={a}", "target_em": score_exact_match(preds, [r for _, r in pairs]),
                        "target_loss": eval_loss(model, rows, pad, 8, rt)["loss"],
                        "ref_loss_increase": m["adapted"]["loss"] - m["base"]["loss"], "kl_mean": m["kl_mean"],
                        "kl_mode": "top-k", "old_task_increase": o["adapted"]["loss"] - o["base"]["loss"]})
        print(f"[WiSE-FT α={a}] {json.dumps(out[-1])}", file=sys.stderr)
    return out


def mixed_cost(steps: int = 3) -> dict[str, float]:
    """Seconds per forward+backward of 8 built-in-task rows: one adapter vs two adapters routed per row."""

    import deltatune
    from deltatune.models import load_model
    from deltatune.tasks import make_task
    from deltatune.train.data import collate, examples_from_records, tokenize_examples

    model, tok = load_model("default", dtype="fp32")
    recs, _ = make_task(8, 0, 0)
    rows, _, _ = tokenize_examples(examples_from_records([(str(i), r) for i, r in enumerate(recs)], "chat").examples,
                                   tok, 1024)
    batch = collate(rows, int(tok.pad_token_id))
    cfg = deltatune.LoraConfig(r=16, alpha=32, target_modules="all-linear")
    deltatune.inject(model, cfg, "a")
    deltatune.inject(model, cfg, "b")

    def step(names: list[str | None] | None) -> float:
        t0 = time.perf_counter()
        if names is None:
            deltatune.set_active(model, "a")
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        else:
            deltatune.set_active(model, ["a", "b"])
            with deltatune.adapter_per_sample(model, names):
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    mixed = ["a", "b"] * 4
    step(None), step(mixed)  # warm-up
    one = min(step(None) for _ in range(steps))
    two = min(step(mixed) for _ in range(steps))  # type: ignore[arg-type]
    return {"one_adapter_s": one, "mixed_two_adapters_s": two, "ratio": two / one}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "—"
    if pct:
        return f"{100 * v:.1f} %"
    return f"{v:+.4f}" if isinstance(v, float) else str(v)


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| run | target EM | target loss | ref. loss Δ | KL(base‖adapted) | old-task loss Δ | s/step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error']} | | | | | |")
            continue
        kl = f"{r['kl_mean']:.4f}" + ("" if r.get("kl_mode") == "exact" else "ᵏ") if r.get("kl_mean") is not None else "—"
        lines.append(f"| {r['name']} | {_fmt(r.get('target_em'), True)} | {r['target_loss']:.4f} | "
                     f"{_fmt(r.get('ref_loss_increase'))} | {kl} | {_fmt(r.get('old_task_increase'))} | "
                     f"{r['step_s']:.2f} |" if "step_s" in r else
                     f"| {r['name']} | {_fmt(r.get('target_em'), True)} | {r['target_loss']:.4f} | "
                     f"{_fmt(r.get('ref_loss_increase'))} | {kl} | {_fmt(r.get('old_task_increase'))} | — |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_forgetting")
    ap.add_argument("--configs", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help=f"reduced budget and configs {QUICK} (+ WiSE-FT)")
    ap.add_argument("--num-train", type=int, default=320)
    ap.add_argument("--num-eval", type=int, default=40)
    ap.add_argument("--ref-tokens", type=int, default=4096)
    ap.add_argument("--old-task", type=int, default=64, help="old-task examples")
    ap.add_argument("--fisher", type=int, default=64, help="EWC Fisher samples")
    ap.add_argument("--ewc-full", default="1e5", help="λ of EWC for full fine-tuning (comma-separated: one row each)")
    ap.add_argument("--ewc-lora", default="1e5", help="λ of EWC for LoRA (penalty on s·BA; comma-separated: one row each)")
    ap.add_argument("--kl", default="1.0", help="λ of the KL-to-base penalty")
    ap.add_argument("--no-wise", action="store_true")
    ap.add_argument("--mixed-cost", action="store_true")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    ap.add_argument("--reuse", action="store_true", help="keep the finished runs already in --out (same command)")
    args = ap.parse_args()
    if args.quick:
        args.num_train, args.num_eval, args.ref_tokens, args.old_task, args.fisher = 64, 16, 1024, 24, 16
    names = args.configs.split(",") if args.configs else (QUICK if args.quick else list(CONFIGS))
    out = Path(args.out)
    old_task, replay = write_side_data(out, args.old_task, 200)
    common = [f"data.num_train={args.num_train}", f"data.num_eval={args.num_eval}", "eval.before=false",
              f"forgetting.max_tokens={args.ref_tokens}", f"forgetting.old_task_file={old_task}", *args.extra]
    subs = {"kl": args.kl, "fisher": str(args.fisher), "replay": str(replay)}
    rows = []
    for n in names:
        # A comma-separated λ list runs one row per value ("full+EWC λ=1e4", ...): EWC's strength
        # is the knob the table is about, and one untuned value says little.
        key = "ewc_full" if n == "full+EWC" else "ewc_lora" if n == "LoRA+EWC" else None
        lams = getattr(args, key).split(",") if key else [""]
        for lam in lams:
            label = f"{n} λ={lam}" if key and len(lams) > 1 else n
            rows.append(run_one(label, [s.format(**subs, **({key: lam} if key else {})) for s in CONFIGS[n]],
                                out, common, args.reuse))
    full = next((r for r in rows if r["name"] == "full" and "error" not in r), None)
    if full is not None and not args.no_wise:
        rows += wise_rows(Path(full["dir"]), old_task, args)
    by = {r["name"]: r for r in rows}
    lines = table(rows)
    lines.append("")
    lines.append("ᵏ: top-256 cached base log-probs (a lower bound of the exact KL); unmarked: exact (adapters disabled).")
    ewc_rows = [(("full" if r["name"].startswith("full") else "LoRA r=16"), r["name"]) for r in rows
                if "EWC" in r["name"]]
    for plain, reg in ewc_rows:
        if "step_s" in by.get(plain, {}) and "step_s" in by.get(reg, {}):
            lines.append(f"{reg}: step {by[reg]['step_s']:.2f} s vs {by[plain]['step_s']:.2f} s "
                         f"({by[reg]['step_s'] / by[plain]['step_s']:.2f}×), Fisher estimate "
                         f"{by[reg].get('fisher_s', 0):.1f} s ({args.fisher} examples)")
    if args.mixed_cost:
        mc = mixed_cost()
        lines.append(f"mixed two-adapter batch (8 rows, per-row routing) {mc['mixed_two_adapters_s']:.2f} s vs one "
                     f"adapter {mc['one_adapter_s']:.2f} s per forward+backward ({mc['ratio']:.2f}×)")
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "forgetting.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Target exact match vs reference KL (log scale: the runs' KL spans three decades)."""
    from deltatune.train.forgetting import plot_learning_vs_forgetting

    pts = [{"label": r["name"], "x": r["target_em"], "y": r["kl_mean"]} for r in rows
           if "error" not in r and r.get("target_em") is not None and r.get("kl_mean")]
    if pts:
        plot_learning_vs_forgetting(pts, path, x_label="target exact match (learning)",
                                    y_label="mean KL(base || adapted), nats (forgetting)", log_y=True)
        print(f"scatter: {path}")


if __name__ == "__main__":
    main()
