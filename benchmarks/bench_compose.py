"""Adapter composition on the real default model (issue #10, item 5).

1. data:    three built-in tasks (JSON extraction, sentiment, date normalisation), JSONL files; a
            mixed file of --mix-per-task examples per task (not in any adapter's training data).
2. train:   one LoRA adapter per task with `deltatune train` (the default LoRA settings, --steps steps).
3. mix:     `deltatune train --set method=mix` on the mixed file, per adapter and per layer.
4. score:   exact match on --eval-per-task held-out examples of each task for: the base model, each
            single adapter, uniform cat, ties_svd, dare_ties_svd, della, breadcrumbs_ties,
            task_arithmetic with a weight tuned on the mixed file's loss, mix (adapter / layer), and
            negation (extraction + sentiment merged into the weights, then −1 × extraction active).
5. timing:  compose 8 random r=16 all-linear adapters of the default model's shapes, each method in
            its own process: wall time and peak RSS over the process's baseline; PEFT's
            add_weighted_adapter on the same adapters for the types it has.

Each stage caches its results in --out, so a rerun only does what is missing. Prints Markdown.

Usage: python benchmarks/bench_compose.py [--out runs/bench_compose] [--steps 30] [--only timing]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# Before torch loads (children import it first): idle OpenMP threads sleep instead of spinning, which
# on a shared, oversubscribed CPU otherwise multiplies wall times (see tests/conftest.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TASK_NAMES = ("extract", "sentiment", "dates")
MAX_NEW = {"extract": 48, "sentiment": 4, "dates": 10}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def stage_data(out: Path, n_train: int, n_eval: int, n_mix: int) -> None:
    from deltatune.tasks_extra import TASKS

    d = out / "data"
    if (d / "mixed.jsonl").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    mixed = []
    for name in TASK_NAMES:
        train, ev = TASKS[name](n_train + n_mix, n_eval, 0)
        _write_jsonl(d / f"{name}_train.jsonl", train[:n_train])
        _write_jsonl(d / f"{name}_eval.jsonl", ev)
        mixed += train[n_train:]
    _write_jsonl(d / "mixed.jsonl", mixed)


def _train(args_set: list[str], run_dir: Path) -> dict[str, Any]:
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())
    cmd = [sys.executable, "-m", "deltatune.cli", "train", "--no-progress"]
    for s in [*args_set, f"output_dir={run_dir}", "eval.before=false", "eval.exact_match=false"]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    print(f"  trained {run_dir.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((run_dir / "summary.json").read_text())


def stage_train(out: Path, steps: int) -> None:
    for name in TASK_NAMES:
        _train([f"data.train_file={out / 'data' / f'{name}_train.jsonl'}",
                f"data.eval_file={out / 'data' / f'{name}_eval.jsonl'}", f"train.max_steps={steps}"],
               out / "adapters" / name)


def stage_mix(out: Path, steps: int, lr: float) -> None:
    ads = ",".join(str(out / "adapters" / n / "adapter") for n in TASK_NAMES)
    for gran in ("adapter", "layer"):
        _train(["method=mix", f"mix.adapters=[{ads}]", f"mix.granularity={gran}",
                f"data.train_file={out / 'data' / 'mixed.jsonl'}", f"train.max_steps={steps}", f"train.lr={lr}",
                "train.warmup_steps=0", "train.batch_size=8"], out / f"mix_{gran}")


# ------------------------------------------------------------------------------------------- scoring
class Scorer:
    def __init__(self, out: Path, batch_size: int) -> None:
        from deltatune.models import load_model
        from deltatune.train.data import load_examples, prompt_and_reference

        self.out, self.batch_size = out, batch_size
        self.model, self.tok = load_model("default")
        self.evals: dict[str, tuple[list[Any], list[str]]] = {}
        for name in TASK_NAMES:
            pairs = [prompt_and_reference(e) for e in load_examples(out / "data" / f"{name}_eval.jsonl").examples]
            self.evals[name] = ([p for p, _ in pairs if p], [r for p_r in pairs if p_r for r in [p_r[1]]])
        self.mixed = [e for e in load_examples(out / "data" / "mixed.jsonl").examples]
        self.results: dict[str, dict[str, float]] = {}
        path = out / "scores.json"
        if path.exists():
            self.results = json.loads(path.read_text())

    def score(self, label: str) -> dict[str, float]:
        from deltatune.tasks import score_exact_match
        from deltatune.train.evaluate import generate_texts

        row = {}
        for name, (prompts, refs) in self.evals.items():
            preds = generate_texts(self.model, self.tok, prompts, max_new_tokens=MAX_NEW[name],
                                   batch_size=self.batch_size, progress=False)
            row[name] = score_exact_match(preds, refs)
        self.results[label] = row
        (self.out / "scores.json").write_text(json.dumps(self.results, indent=2))
        print(f"  {label:<40} " + "  ".join(f"{k} {100 * v:5.1f}%" for k, v in row.items()), flush=True)
        return row

    def mixed_loss(self) -> float:
        import torch

        from deltatune.train.data import tokenize_examples

        rows, _, _ = tokenize_examples(self.mixed, self.tok, 256, True)
        total, n = 0.0, 0
        with torch.no_grad():
            for r in rows:
                ids = torch.tensor([r["input_ids"]])
                labels = torch.tensor([r["labels"]])
                logits = self.model(ids).logits[:, :-1].float()
                tgt = labels[:, 1:]
                mask = tgt != -100
                total += float(torch.nn.functional.cross_entropy(logits[mask], tgt[mask], reduction="sum"))
                n += int(mask.sum())
        return total / n


def stage_score(out: Path, batch_size: int, full: bool) -> dict[str, dict[str, float]]:
    import deltatune
    from deltatune import compose

    sc = Scorer(out, batch_size)
    m = sc.model
    dirs = {n: out / "adapters" / n / "adapter" for n in TASK_NAMES}
    for n, d in dirs.items():
        deltatune.load_adapter(m, d, name=n)
    facts = [compose.read_adapter(dirs[n], name=n) for n in TASK_NAMES]

    def run(label: str, setup: Any) -> None:
        if label in sc.results:
            return
        setup()
        sc.score(label)

    def weighted(w: dict[str, float]) -> Any:
        return lambda: compose.set_weighted(m, w)

    def composed(name: str, method: str, weights: list[float], **kw: Any) -> Any:
        def setup() -> None:
            if name not in m.deltatune_state.configs:
                c = compose.combine(facts, weights, method, **kw)
                energy = [e for e in c.energy.values() if e is not None]
                if energy:
                    print(f"  {name}: energy kept mean {sum(energy) / len(energy):.3f}, min {min(energy):.3f}")
                compose.load_composed(m, c, name)
            deltatune.set_active(m, name)
        return setup

    with deltatune.disable_adapters(m):
        if "base" not in sc.results:
            sc.score("base")
    for n in TASK_NAMES:
        run(f"single: {n}", weighted({n: 1.0}))
    third = [1 / 3] * 3
    run("cat, uniform 1/3 (exact average)", composed("cat", "cat", third))
    run("ties_svd (λ=1, density 0.5, rank 16)", composed("ties_svd", "ties_svd", [1.0] * 3, density=0.5))
    run("dare_ties_svd (λ=1, density 0.5, rank 16)", composed("dare_ties_svd", "dare_ties_svd", [1.0] * 3, density=0.5))
    run("della (λ=1, density 0.5, ε 0.1, rank 16)", composed("della", "della", [1.0] * 3, density=0.5))
    if full:  # breadcrumbs too (skipped by default: CPU time)
        run("breadcrumbs_ties (λ=1, density 0.5, rank 16)",
            composed("breadcrumbs_ties", "breadcrumbs_ties", [1.0] * 3, density=0.5))
    tuned_path = out / "task_arithmetic_tuning.json"
    if tuned_path.exists():
        tuning = json.loads(tuned_path.read_text())
    else:
        tuning = {}
        for lam in ((0.4, 0.6, 0.8, 1.0) if full else (0.5, 1.0)):
            compose.set_weighted(m, {n: lam for n in TASK_NAMES})
            tuning[str(lam)] = sc.mixed_loss()
        tuned_path.write_text(json.dumps(tuning, indent=2))
    best = float(min(tuning, key=lambda k: tuning[k]))
    run(f"task_arithmetic, λ={best:g} each (tuned on mixed loss)", weighted({n: best for n in TASK_NAMES}))
    for gran in ("adapter", "layer"):
        d = out / f"mix_{gran}" / "adapter"
        name = f"mix_{gran}"
        if name not in m.deltatune_state.configs:
            deltatune.load_adapter(m, d, name=name)
        run(f"mix, λ per {gran} (trained on the mixed file)", weighted({name: 1.0}))
    # negation: extraction + sentiment merged into the weights, then extraction subtracted (λ = −1)
    if "negation: … − extract (λ = −1, unmerged)" not in sc.results:
        if "extract_neg" not in m.deltatune_state.configs:
            compose.load_composed(m, compose.combine([facts[0]], [-1.0], "task_arithmetic"), "extract_neg")
        compose.merge_weighted(m, {"extract": 1.0, "sentiment": 1.0})  # W' = W₀ + Δ_extract + Δ_sentiment
        sc.score("negation: extract + sentiment merged")
        deltatune.set_active(m, ["extract", "sentiment", "extract_neg"])  # merged ones stay merged; −Δ_extract on top
        sc.score("negation: … − extract (λ = −1, unmerged)")
        deltatune.unmerge(m)
    return sc.results


# ------------------------------------------------------------------------------------------- timing
def _shapes(out: Path) -> dict[str, tuple[int, int]]:
    """(k, d) of every adapted module of the default model, from a trained adapter's fingerprint
    (LoRA on all 7 projections of the 30 blocks): no model load in the timed processes."""
    from deltatune import read_adapter_info

    fp = read_adapter_info(out / "adapters" / "extract" / "adapter").fingerprint
    assert fp is not None
    return {p: (int(i["shape"][0]), int(i["shape"][1])) for p, i in fp["modules"].items()}


def _random_adapters(shapes: dict[str, tuple[int, int]], n: int, r: int = 16) -> list[Any]:
    import torch

    from deltatune import compose

    g = torch.Generator().manual_seed(0)
    return [compose.AdapterFactors(f"a{i}", {p: compose.ModuleFactors(
        "linear", torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(d, r, generator=g) * 0.01, 2.0)
        for p, (k, d) in shapes.items()}) for i in range(n)]


def _kw(method: str) -> dict[str, Any]:
    return {"density": 0.5} if ("ties" in method or "dare" in method or "della" in method) else {}


def timing_child(out: Path, method: str, n: int) -> None:
    """One composition in this process: prints JSON {seconds, extra peak RSS over the baseline}."""
    import torch

    from deltatune import compose

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    adapters = _random_adapters(_shapes(out), n)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    c = compose.combine(adapters, [1.0 / n] * n, method, **_kw(method))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": dt, "extra_peak_mb": peak - base, "modules": len(c.modules)}))


def peft_timing_child(out: Path, method: str, n: int) -> None:
    """PEFT's add_weighted_adapter on the same adapters, on a module tree of the default model's
    adapted linears (weights left uninitialised: composition never reads them)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    shapes = _shapes(out)
    root = nn.Module()
    for path, (k, d) in shapes.items():
        parent = root
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(path.split(".")[-1], nn.utils.skip_init(nn.Linear, k, d, bias=False))
    adapters = _random_adapters(shapes, n)
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=sorted({p.split(".")[-1] for p in shapes}))
    pm = get_peft_model(root, cfg, adapter_name="x0")
    for i in range(1, n):
        pm.add_adapter(f"x{i}", cfg)
    with torch.no_grad():
        for name, mod in pm.named_modules():
            path = name.removeprefix("base_model.model.")
            if path in shapes and hasattr(mod, "lora_A"):
                for i in range(n):
                    mod.lora_A[f"x{i}"].weight.copy_(adapters[i].modules[path].a)
                    mod.lora_B[f"x{i}"].weight.copy_(adapters[i].modules[path].b)
    del adapters
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    pm.add_weighted_adapter([f"x{i}" for i in range(n)], [1.0 / n] * n, "m", combination_type=method, **_kw(method))
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "seconds": dt, "extra_peak_mb": peak - base}))


def stage_timing(out: Path, n: int, full: bool) -> dict[str, Any]:
    path = out / "timing.json"
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for method in ("cat", "task_arithmetic", "svd", "ties_svd", "dare_ties_svd", "della"):
        for who in ("deltatune", "peft"):
            key = f"{who}:{method}"
            if key in res or (who == "peft" and method in ("task_arithmetic", "della")) or (
                    not full and method in ("della",) + (("dare_ties_svd",) if who == "peft" else ())):
                continue
            flag = "--timing-child" if who == "deltatune" else "--peft-timing-child"
            proc = subprocess.run([sys.executable, __file__, flag, method, "--n", str(n), "--out", str(out)],
                                  capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            res[key] = json.loads(line[-1]) if line else {"error": proc.stderr.strip().splitlines()[-1:]}
            print(f"  {key}: {res[key]}", flush=True)
            path.write_text(json.dumps(res, indent=2))
    return res


def _fmt(r: dict[str, Any]) -> tuple[str, str]:
    return (f"{r['seconds']:.2f} s", f"{r['extra_peak_mb']:.0f} MiB") if "seconds" in r else ("—", "—")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench_compose")
    ap.add_argument("--steps", type=int, default=30, help="training steps per task adapter (batch 8)")
    ap.add_argument("--mix-steps", type=int, default=12)
    ap.add_argument("--mix-lr", type=float, default=0.05)
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--eval-per-task", type=int, default=32)
    ap.add_argument("--mix-per-task", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--n", type=int, default=8, help="adapters composed in the timing stage")
    ap.add_argument("--only", choices=["scores", "timing"])
    ap.add_argument("--full", action="store_true", help="also breadcrumbs and a finer task-arithmetic grid; PEFT timing for every type")
    ap.add_argument("--timing-child")
    ap.add_argument("--peft-timing-child")
    args = ap.parse_args()
    if args.timing_child:
        return timing_child(Path(args.out), args.timing_child, args.n)
    if args.peft_timing_child:
        return peft_timing_child(Path(args.out), args.peft_timing_child, args.n)
    out = Path(args.out)
    if args.only != "timing":
        stage_data(out, args.n_train, args.eval_per_task, args.mix_per_task)
        print("training task adapters …", flush=True)
        stage_train(out, args.steps)
        print("training mixing weights …", flush=True)
        stage_mix(out, args.mix_steps, args.mix_lr)
        print("scoring …", flush=True)
        scores = stage_score(out, args.batch_size, args.full)
        print(f"\n| variant | {' | '.join(TASK_NAMES)} |\n|---|{'---|' * len(TASK_NAMES)}")
        for label, row in scores.items():
            print(f"| {label} | " + " | ".join(f"{100 * row[t]:.1f} %" for t in TASK_NAMES) + " |")
    if args.only != "scores":
        print(f"\ncomposing {args.n} adapters (r=16, all 7 projections × 30 layers) …", flush=True)
        res = stage_timing(out, args.n, args.full)
        print("\n| method | deltatune time | deltatune extra peak RSS | PEFT time | PEFT extra peak RSS |\n|---|---|---|---|---|")
        for method in ("cat", "task_arithmetic", "svd", "ties_svd", "dare_ties_svd", "della"):
            d, p = res.get(f"deltatune:{method}", {}), res.get(f"peft:{method}", {})
            print(f"| {method} | {' | '.join(_fmt(d))} | {' | '.join(_fmt(p))} |")


if __name__ == "__main__":
    main()
