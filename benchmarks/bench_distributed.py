"""Several processes on one machine (torchrun, gloo on CPU): per-rank memory and step time.

    python benchmarks/bench_distributed.py [--steps 4] [--batch 2] [--seq 256] [--only full,lora,qlora]

Each configuration runs in a fresh process (or a fresh 2-process torchrun launch), on the default
model (SmolLM2-135M, fp32), through the same Runtime calls as ``deltatune train``:

  full   fine-tuning, 1 process vs FSDP2 on 2: per-rank peak RSS and the bytes of parameters +
         gradients + AdamW state each rank holds (target: about half of one process's)
  lora   r=16 all-linear, 1 process vs DDP on 2 at the same per-rank batch: step time (the
         overhead of the gradient all-reduce; each rank also sees half the global batch)
  qlora  NF4 base under FSDP2 on 2, packed 4-bit weights sharded vs replicated (runtime.shard_4bit)

Peak RSS is the kernel's high-water mark (VmHWM), reset after the model is loaded and wrapped so
loading transients do not count. On a shared CPU these timings are noisy: run it on a quiet
machine, once; the figures in the README say when and where they were taken.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def _local_bytes(t: Any) -> int:
    from torch.distributed.tensor import DTensor

    t = t.to_local() if isinstance(t, DTensor) else t
    return int(t.numel() * t.element_size())


def worker(method: str, strategy: str, steps: int, batch: int, seq: int, shard_4bit: bool) -> dict[str, Any]:
    import torch

    from deltatune.config import load_config
    from deltatune.objectives.causal_lm import model_loss_sum
    from deltatune.registry import apply_method
    from deltatune.train.config import TrainConfig
    from deltatune.train.distributed import create_runtime
    from deltatune.train.hooks import RunInfo
    from deltatune.train.optim import make_optimizer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(TrainConfig, None, [f"method={method}", "model.dtype=fp32", "train.bf16=false",
                                          f"runtime.strategy={strategy}", f"runtime.shard_4bit={shard_4bit}",
                                          "train.lr=1e-5"])
    rt = create_runtime(cfg, "cpu")
    from deltatune.models import load_model

    model, _ = load_model("default", dtype="fp32", device="cpu")
    # as the train loop: apply_method quantizes the base first (qlora = lora + model.quantize nf4);
    # the method's own apply alone would leave it fp32
    hooks = apply_method(model, cfg, RunInfo(total_steps=steps + 1, steps_per_epoch=steps + 1, world=rt.world))
    if method == "qlora" and not any(p.dtype == torch.uint8 for p in model.parameters()):
        raise SystemExit("qlora: the base was not quantized to 4 bits")
    params = [p for p in model.parameters() if p.requires_grad]
    upcast = rt.fp32_masters(params)
    net = rt.wrap(model, hooks)
    params, upcast = rt.rebind(model, params, upcast)
    optimizer = make_optimizer(cfg, model)
    g = torch.Generator().manual_seed(rt.rank)
    vocab = int(model.config.vocab_size)

    def step() -> None:
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        n = rt.all_sum(batch * (seq - 1))
        loss = rt.world * model_loss_sum(net, b) / n
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated: they count

    step()  # the first step allocates the optimizer state
    rt.barrier()
    _reset_peak()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    rt.barrier()
    seconds = (time.perf_counter() - t0) / steps
    state = sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    held = {
        "params_mb": sum(_local_bytes(p) for p in model.parameters()) / 2**20,
        "grads_mb": sum(_local_bytes(p.grad) for p in params if p.grad is not None) / 2**20,
        "optimizer_mb": state / 2**20,
    }
    out = {"rank": rt.rank, "world": rt.world, "strategy": getattr(rt, "strategy", "one process"),
           "step_s": seconds, "peak_rss_mb": _rss_mb("VmHWM"), **held}
    return {"ranks": rt.all_gather(out)}


def _launch(args: argparse.Namespace, method: str, strategy: str, nproc: int, shard_4bit: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [__file__, "--worker", method, strategy, str(int(shard_4bit)), str(result), "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                    if nproc > 1 else [sys.executable])
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run(launcher + cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method}/{strategy}/{nproc} failed:\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())  # type: ignore[no-any-return]


def _row(name: str, r: dict[str, Any]) -> str:
    ranks = r["ranks"]
    state = max(x["params_mb"] + x["grads_mb"] + x["optimizer_mb"] for x in ranks)
    return (f"| {name:<34} | {len(ranks)} | {max(x['peak_rss_mb'] for x in ranks):8.0f} | {state:8.0f} | "
            f"{max(x['step_s'] for x in ranks):6.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="sequences per process and step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default="full,lora,qlora")
    ap.add_argument("--worker", nargs=4, metavar=("METHOD", "STRATEGY", "SHARD4BIT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, strategy, shard, out = args.worker
        res = worker(method, strategy, args.steps, args.batch, args.seq, bool(int(shard)))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(out).write_text(json.dumps(res))
        return
    only = set(args.only.split(","))
    rows = []
    print(f"default model, fp32, batch {args.batch} × {args.seq} tokens per process, {args.steps} timed steps; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print("| configuration                      | processes | peak RSS / rank (MiB) | params+grads+AdamW / rank (MiB) "
          "| s / step |")
    print("|---|---|---|---|---|")
    if "full" in only:
        one, two = _launch(args, "full", "auto", 1), _launch(args, "full", "fsdp2", 2)
        rows += [_row("full, 1 process", one), _row("full, FSDP2", two)]
        s1 = sum(one["ranks"][0][k] for k in ("params_mb", "grads_mb", "optimizer_mb"))
        s2 = max(sum(x[k] for k in ("params_mb", "grads_mb", "optimizer_mb")) for x in two["ranks"])
        rows.append(f"|   → FSDP2 state per rank / one process: {s2 / s1:.2f}; peak RSS per rank / one process: "
                    f"{max(x['peak_rss_mb'] for x in two['ranks']) / one['ranks'][0]['peak_rss_mb']:.2f} | | | | |")
    if "lora" in only:
        one, two = _launch(args, "lora", "auto", 1), _launch(args, "lora", "ddp", 2)
        rows += [_row("LoRA r=16, 1 process", one), _row("LoRA r=16, DDP", two)]
        rows.append(f"|   → DDP step time / one process (same per-rank batch): "
                    f"{max(x['step_s'] for x in two['ranks']) / one['ranks'][0]['step_s']:.2f} | | | | |")
    if "qlora" in only:
        sh, rep = _launch(args, "qlora", "fsdp2", 2, True), _launch(args, "qlora", "fsdp2", 2, False)
        rows += [_row("QLoRA, FSDP2, 4-bit sharded", sh), _row("QLoRA, FSDP2, 4-bit replicated", rep)]
    for r in rows:
        print(r, flush=True)


if __name__ == "__main__":
    main()
