"""DreamBooth in miniature (MISSION §4): subject fidelity, prior preservation / language drift and
diversity, for λ ∈ {0, 0.5, 1, 2} and LoRA vs full fine-tuning, on the Fashion-MNIST miniature SD
pipeline (``python -m deltatune.diffusion.miniature``); plus step time and peak memory against diffusers'
``examples/dreambooth/train_dreambooth_lora.py`` on the same pipeline and settings (``--peer SCRIPT``).

    python benchmarks/bench_dreambooth.py [--pipeline DIR] [--steps 200] [--seeds 0 1] [--peer train_dreambooth_lora.py]

Metrics, the paper's (Ruiz et al. 2023 §4.1) with a small CNN the script trains on the same data as
the feature extractor (its penultimate layer, cosine similarity) in place of DINO/CLIP:
  fidelity   mean cos(generated "a photo of a sks bag", real instance images)       (DINO / CLIP-I)
  class_acc  fraction of "a photo of a bag" samples the classifier calls a bag      (prior preservation)
  prior_sim  mean cos(class-prompt samples, the base model's class-prompt samples)  (PRES-like: higher = kept)
  drift      mean cos(class-prompt samples, real instance images)                   (language drift: higher = drifted)
  div        mean pairwise (1 − cos) among the class-prompt samples                 (DIV)
The subject: K = 5 bags of one visually distinct sub-style — the k-means cluster (k = 10, classifier
features of the test split's bags) farthest from the class centroid, its 5 members nearest its centre.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deltatune.config import load_config  # noqa: E402
from deltatune.diffusion import load_diffusers_lora, load_pipeline, lora_target_regex, save_grid  # noqa: E402
from deltatune.diffusion.data import save_png  # noqa: E402
from deltatune.diffusion.miniature import (  # noqa: E402
    FASHION_CLASSES,
    default_pipeline_dir,
    load_fashion_mnist,
    pretrain,
    to_pixels,
)
from deltatune.train.config import TrainConfig  # noqa: E402
from deltatune.train.loop import run  # noqa: E402

CLASS = FASHION_CLASSES.index("bag")
INSTANCE_PROMPT, CLASS_PROMPT, NEW_CONTEXT = "a photo of a sks bag", "a photo of a bag", "a picture of a sks bag"


class SmallCNN(nn.Module):
    """16×16 gray → 10 classes; ``features`` is the 64-d penultimate layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 16, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, rgb01: torch.Tensor) -> torch.Tensor:  # (N, 3, 16, 16) in [0, 1] → (N, 64)
        return self.body(rgb01.mean(1, keepdim=True) * 2 - 1)

    def forward(self, rgb01: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(rgb01))


def classifier(cache: Path) -> tuple[SmallCNN, float]:
    from safetensors.torch import load_file, save_file

    net = SmallCNN()
    te_x, te_y = load_fashion_mnist("test")
    test = (to_pixels(te_x, 16) + 1) / 2
    if cache.exists():
        net.load_state_dict(load_file(str(cache)))
    else:
        torch.manual_seed(0)
        x, y = load_fashion_mnist("train")
        pixels, labels = (to_pixels(x, 16) + 1) / 2, torch.from_numpy(y)
        opt = torch.optim.Adam(net.parameters(), 2e-3)
        for _epoch in range(2):
            perm = torch.randperm(len(pixels))
            for i in range(0, len(perm), 256):
                idx = perm[i:i + 256]
                loss = F.cross_entropy(net(pixels[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(net.state_dict(), str(cache))
    net.eval()
    with torch.no_grad():
        acc = float((net(test).argmax(1) == torch.from_numpy(te_y)).float().mean())
    return net, acc


def pick_subject(net: SmallCNN, k: int = 5) -> torch.Tensor:
    x, y = load_fashion_mnist("test")
    bags = (to_pixels(x[y == CLASS], 16) + 1) / 2
    with torch.no_grad():
        f = F.normalize(net.features(bags), dim=1)
    g = torch.Generator().manual_seed(0)
    cent = f[torch.randperm(len(f), generator=g)[:10]].clone()
    for _ in range(25):  # k-means, cosine
        assign = (f @ cent.T).argmax(1)
        cent = torch.stack([F.normalize(f[assign == c].mean(0), dim=0) if (assign == c).any() else cent[c]
                            for c in range(len(cent))])
    sizes = torch.bincount(assign, minlength=len(cent))
    mean = F.normalize(f.mean(0), dim=0)
    far = [c for c in (cent @ mean).argsort().tolist() if sizes[c] >= 20][0]
    members = (assign == far).nonzero().flatten()
    order = (f[members] @ cent[far]).argsort(descending=True)[:k]
    return bags[members[order]]


@torch.no_grad()
def metrics(net: SmallCNN, inst_gen: torch.Tensor, cls_gen: torch.Tensor, real_inst: torch.Tensor,
            base_cls: torch.Tensor | None) -> dict[str, float]:
    fi, fc, fr = (F.normalize(net.features(t), dim=1) for t in (inst_gen, cls_gen, real_inst))
    out = {"fidelity": float((fi @ fr.T).mean()), "class_acc": float((net(cls_gen).argmax(1) == CLASS).float().mean()),
           "drift": float((fc @ fr.T).mean())}
    n = len(fc)
    sim = fc @ fc.T
    out["div"] = float((1 - sim).sum() / (n * (n - 1)))
    if base_cls is not None:
        out["prior_sim"] = float((fc @ F.normalize(net.features(base_cls), dim=1).T).mean())
    return out


def sample(model, prompt: str, n: int) -> torch.Tensor:
    return model.sample([prompt] * n, [10_000 + i for i in range(n)], steps=25, guidance_scale=3.0)


def train_one(pipe: Path, inst: Path, cls: Path, out: Path, method: str, lam: float, seed: int, steps: int,
              n_class: int, extra: list[str]) -> dict:
    lr = 1e-3 if method == "lora" else 1e-4
    over = ["objective=dreambooth", f"method={method}", f"model.spec={pipe}", f"output_dir={out}",
            f"dreambooth.instance_dir={inst}", f"dreambooth.instance_prompt={INSTANCE_PROMPT}",
            f"dreambooth.class_prompt={CLASS_PROMPT}", f"dreambooth.with_prior_preservation={str(lam > 0).lower()}",
            f"dreambooth.prior_loss_weight={lam}", f"dreambooth.num_class_images={n_class}", f"dreambooth.class_dir={cls}",
            "dreambooth.num_validation_images=0", "eval.before=false", "eval.exact_match=false",
            f"train.max_steps={steps}", "train.batch_size=2", f"train.lr={lr}", "train.schedule=constant",
            "train.bf16=false", f"train.seed={seed}", "lora.r=8", "lora.alpha=8",
            "lora.target_modules=" + json.dumps(lora_target_regex()), *extra]
    res = run(load_config(TrainConfig, None, over), progress=False)
    return res.summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    committed = ROOT / "assets" / "mini-sd-fashion"
    p.add_argument("--pipeline", default=str(committed if committed.exists() else default_pipeline_dir()),
                   help="the miniature pipeline (default: the committed assets/mini-sd-fashion; built when missing)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dreambooth"))
    p.add_argument("--work", default="/tmp/deltatune-bench-dreambooth")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 2.0])
    p.add_argument("--methods", nargs="+", default=["lora", "full"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--class-images", type=int, default=50)
    p.add_argument("--peer", help="path to diffusers' examples/dreambooth/train_dreambooth_lora.py (timing only)")
    p.add_argument("--peer-steps", type=int, default=60)
    p.add_argument("--table", metavar="RESULTS_JSON", help="only print the tables of an earlier run's results.json")
    args = p.parse_args()
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return 0
    torch.set_num_threads(1)
    pipe, out, work = Path(args.pipeline), Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    if not (pipe / "model_index.json").exists():
        pretrain(pipe)
    net, clf_acc = classifier(work / "classifier.safetensors")
    print(f"classifier: {100 * clf_acc:.1f} % on the real 16×16 Fashion-MNIST test images")
    subject = pick_subject(net)
    inst = work / "instance"
    for i, img in enumerate(subject):
        save_png(inst / f"{i}.png", img)
    cls = work / "class"

    base = load_pipeline(pipe)
    with torch.no_grad():
        prompted = {c: sample(base, f"a photo of a {name}", args.samples) for c, name in enumerate(FASHION_CLASSES)}
        prompt_acc = float(np.mean([(net(imgs).argmax(1) == c).float().mean().item() for c, imgs in prompted.items()]))
    print(f"base pipeline: the prompted class in {100 * prompt_acc:.1f} % of its samples (classifier)")
    base_inst, base_cls = sample(base, INSTANCE_PROMPT, args.samples), prompted[CLASS]
    rows: list[dict] = [{"method": "base", "lambda": None, "seed": None,
                         **metrics(net, base_inst, base_cls, subject, base_cls)}]
    grid = [("real instance images", subject), ("base: " + INSTANCE_PROMPT, base_inst[:8]), ("base: " + CLASS_PROMPT, base_cls[:8])]
    # λ = 0 and λ = 1 of each method first, so an interrupted run already holds the main comparison.
    lams = sorted(args.lambdas, key=lambda v: (v not in (0.0, 1.0), v))
    order = [(m, lam) for lam in lams for m in args.methods]
    result = {"classifier_test_acc": clf_acc, "base_prompted_class_acc": prompt_acc, "steps": args.steps,
              "samples": args.samples, "class_images": args.class_images, "rows": rows}
    for method, lam in order:
        for seed in args.seeds:
            run_dir = work / f"{method}-l{lam}-s{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            t0 = time.perf_counter()
            s = train_one(pipe, inst, cls, run_dir, method, lam, seed, args.steps, args.class_images, [])
            model = load_pipeline(pipe)
            if method == "lora":
                load_diffusers_lora(model, run_dir)
            else:
                model = load_pipeline(run_dir / "model")
            gi, gc = sample(model, INSTANCE_PROMPT, args.samples), sample(model, CLASS_PROMPT, args.samples)
            gn = sample(model, NEW_CONTEXT, 8)
            m = metrics(net, gi, gc, subject, base_cls)
            rows.append({"method": method, "lambda": lam, "seed": seed, **m,
                         "train_s": s["train_seconds"], "wall_s": round(time.perf_counter() - t0, 1)})
            print(json.dumps(rows[-1]))
            if seed == args.seeds[0]:
                tag = f"{method} lambda={lam:g}"
                grid += [(f"{tag}: {INSTANCE_PROMPT}", gi[:8]), (f"{tag}: {NEW_CONTEXT}", gn[:8]),
                         (f"{tag}: {CLASS_PROMPT}", gc[:8])]
            save_grid(out / "grid.png", grid, scale=3)  # after every run: partial results survive
            (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.peer:
        result["peer"] = peer_timing(Path(args.peer), pipe, inst, cls, work, args.peer_steps)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return 0


def _max_rss_mb(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{r.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))  # type: ignore[union-attr]
    return kb / 1024, r.stdout + r.stderr


def peer_timing(script: Path, pipe: Path, inst: Path, cls: Path, work: Path, steps: int) -> dict:
    """Same pipeline, images, batch (2 pairs), rank 8, λ = 1, fp32, one thread: seconds per step and peak RSS."""
    peer_cls = work / "class-peer"  # the peer reads every file of the folder as an image: PNGs only
    shutil.rmtree(peer_cls, ignore_errors=True)
    peer_cls.mkdir(parents=True)
    pngs = sorted(cls.glob("*.png"))
    for f in pngs:
        shutil.copy(f, peer_cls / f.name)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    out_dir = work / "peer-out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "_peer_shims" / "run_peer.py"), str(script), f"--pretrained_model_name_or_path={pipe}", f"--instance_data_dir={inst}",
           f"--instance_prompt={INSTANCE_PROMPT}", "--with_prior_preservation", f"--class_data_dir={peer_cls}",
           f"--class_prompt={CLASS_PROMPT}", f"--num_class_images={len(pngs)}", "--resolution=16",
           "--train_batch_size=2", f"--max_train_steps={steps}", "--learning_rate=1e-3", "--rank=8",
           "--lr_scheduler=constant", "--lr_warmup_steps=0", "--mixed_precision=no", "--seed=0",
           f"--output_dir={out_dir}", "--report_to=all", "--checkpointing_steps=100000", "--dataloader_num_workers=0"]
    rss, log = _max_rss_mb(cmd, env)
    bars = re.findall(r"Steps: 100%.*?\| *(\d+)/(\d+) \[(\d+):(\d+)", log)
    peer_s = (int(bars[-1][2]) * 60 + int(bars[-1][3])) / steps if bars else float("nan")
    ours = []
    for pre in ("true", "false"):
        d = work / f"ours-timing-{pre}"
        shutil.rmtree(d, ignore_errors=True)
        over = [f"dreambooth.precompute_latents={pre}"]
        bench_dir = str(ROOT / "benchmarks")
        code = (f"import sys, json; sys.path.insert(0, {bench_dir!r}); sys.argv=['x']; import torch; "
                "torch.set_num_threads(1); from bench_dreambooth import train_one; from pathlib import Path; "
                f"s = train_one(Path({str(pipe)!r}), Path({str(inst)!r}), Path({str(cls)!r}), Path({str(d)!r}), "
                f"'lora', 1.0, 0, {steps}, {len(pngs)}, {over!r}); print('SUMMARY', json.dumps(s))")
        rss_ours, log_ours = _max_rss_mb([sys.executable, "-c", code], dict(os.environ, OMP_NUM_THREADS="1"))
        summ = json.loads(log_ours.split("SUMMARY ", 1)[1].splitlines()[0])
        ours.append({"precompute_latents": pre == "true", "s_per_step": summ["train_seconds"] / steps,
                     "peak_rss_mb": round(rss_ours, 1)})
    return {"steps": steps, "diffusers_s_per_step": peer_s, "diffusers_peak_rss_mb": round(rss, 1), "deltatune": ours}


def aggregate(rows: list[dict]) -> dict[tuple[str, float | None], dict[str, list[float]]]:
    """(method, λ) → metric → its values over the seeds, in the rows' order."""
    out: dict[tuple[str, float | None], dict[str, list[float]]] = {}
    for r in rows:
        g = out.setdefault((r["method"], r["lambda"]), {})
        for k, v in r.items():
            if k in ("fidelity", "class_acc", "prior_sim", "drift", "div"):
                g.setdefault(k, []).append(float(v))
    return out


def print_table(result: dict) -> None:
    print("\n| method | λ | seed | fidelity ↑ | class acc ↑ | prior sim ↑ | drift ↓ | diversity ↑ |\n|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        lam = "—" if r["lambda"] is None else f"{r['lambda']:g}"
        print(f"| {r['method']} | {lam} | {r['seed'] if r['seed'] is not None else '—'} | {r['fidelity']:.3f} | "
              f"{r['class_acc']:.2f} | {r.get('prior_sim', float('nan')):.3f} | {r['drift']:.3f} | {r['div']:.3f} |")
    seeds = {r["seed"] for r in result["rows"] if r["seed"] is not None}
    if len(seeds) > 1:
        keys = ("fidelity", "class_acc", "prior_sim", "drift", "div")
        print(f"\nmean ± sample sd over {len(seeds)} training seeds (the base: one row, no training)\n"
              "| method | λ | fidelity ↑ | class acc ↑ | prior sim ↑ | drift ↓ | diversity ↑ |\n|---|---|---|---|---|---|---|")
        order = {"base": 0, "lora": 1, "full": 2}
        groups = sorted(aggregate(result["rows"]).items(),
                        key=lambda kv: (order.get(kv[0][0], 3), kv[0][0], -1.0 if kv[0][1] is None else kv[0][1]))
        for (method, lam), group in groups:
            cells = [f"{np.mean(group[k]):.3f} ± {np.std(group[k], ddof=1) if len(group[k]) > 1 else 0:.3f}"
                     for k in keys]
            print(f"| {method} | {'—' if lam is None else f'{lam:g}'} | " + " | ".join(cells) + " |")
    if "peer" in result:
        pr = result["peer"]
        print(f"\nstep time ({pr['steps']} steps, batch 2 pairs, rank 8, fp32, 1 thread): diffusers "
              f"{pr['diffusers_s_per_step']:.3f} s/step, peak RSS {pr['diffusers_peak_rss_mb']:.0f} MiB")
        for o in pr["deltatune"]:
            print(f"  deltatune (precompute_latents={o['precompute_latents']}): {o['s_per_step']:.3f} s/step, "
                  f"peak RSS {o['peak_rss_mb']:.0f} MiB")


if __name__ == "__main__":
    raise SystemExit(main())
