"""NF4 quantize / dequantize speed: deltatune vs bitsandbytes (CPU) vs torchao, one process.

Runs are interleaved (every implementation once per round) and the minimum over rounds is kept,
so background load affects all of them alike.  Prints times and ratios; never asserts.

Allocation matters as much as the kernel for a 32-64 MB output: a fresh mapping costs a page
fault per 4 KiB page (~8 ms for 32 MB, more than the dequantize itself), a reused heap block
costs nothing.  glibc chooses between the two by its history, so min-of-N can pair one
implementation's best case with another's worst.  Each regime therefore runs in its own
process with glibc pinned (``--alloc``): ``fresh`` (every large block is a new mapping:
MALLOC_MMAP_THRESHOLD_=131072) and ``reused`` (no mappings, nothing returned to the OS:
MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ huge).

    python benchmarks/bench_quant.py                    # 4096x4096 bf16, torch's thread count, both regimes
    python benchmarks/bench_quant.py --threads 1 --rounds 7 --shape 4096 11008 --dtype float32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit


def _peers(
    w: torch.Tensor, block: int
) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]]]:
    quant: dict[str, Callable[[], object]] = {
        "deltatune": lambda: quantize_4bit(w, block, double_quant=True),
    }
    deq: dict[str, Callable[[], object]] = {}
    packed, state = quantize_4bit(w, block, double_quant=True)
    deq["deltatune"] = lambda: dequantize_4bit(packed, state)
    try:
        import bitsandbytes.functional as bnbf

        quant["bitsandbytes"] = lambda: bnbf.quantize_4bit(
            w, blocksize=block, quant_type="nf4", compress_statistics=True
        )
        bp, bs = bnbf.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=True)
        deq["bitsandbytes"] = lambda: bnbf.dequantize_4bit(bp, bs)
    except ImportError:
        print("bitsandbytes not installed: skipped")
    try:
        from torchao.quantization import to_nf4  # torchao >= 0.1x (was torchao.dtypes.nf4tensor)
    except ImportError:
        try:
            from torchao.dtypes.nf4tensor import to_nf4  # type: ignore[no-redef]
        except ImportError:
            to_nf4 = None  # type: ignore[assignment]
            print("torchao not installed: skipped")
    if to_nf4 is not None:
        quant["torchao"] = lambda: to_nf4(w, block, 256)
        nt = to_nf4(w, block, 256)
        deq["torchao"] = lambda: nt.get_original_weight()
    # "write the output": the least any dequantize must do, allocation included.
    deq["write: empty().fill_"] = lambda: torch.empty(w.shape, dtype=w.dtype).fill_(1.0)
    src = w.clone()
    deq["write: clone()"] = lambda: src.clone()
    return quant, deq


def _bench(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    for f in fns.values():  # warm-up (allocator, lazy tables, compiled kernels)
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


ALLOC_ENV = {
    "fresh": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "reused": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=(4096, 4096))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--alloc", choices=["both", "fresh", "reused"], default="both",
                    help="glibc allocation regime, each in its own process (see above)")
    ap.add_argument("--only", choices=["quantize", "dequantize"], help="run one of the two")
    ap.add_argument("--isa", type=int, choices=[0, 1, 2, 3],
                    help="cap the native kernel's instruction set (0 C, 1 SSSE3, 2 AVX2, 3 AVX-512): "
                         "what a CPU without the higher levels would run")
    args = ap.parse_args()
    if os.environ.get("_BENCH_QUANT_ALLOC") is None:  # parent: one child process per regime
        for regime in ("fresh", "reused") if args.alloc == "both" else (args.alloc,):
            print(f"=== allocation regime: {regime} ({' '.join(f'{k}={v}' for k, v in ALLOC_ENV[regime].items())})")
            env = {**os.environ, **ALLOC_ENV[regime], "_BENCH_QUANT_ALLOC": regime}
            subprocess.run([sys.executable, *sys.argv], env=env, check=True)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.isa is not None:
        from deltatune.quant import _native

        kernel = _native.dequant_kernel()
        if kernel is None:
            raise SystemExit("--isa: the native kernel is not available here")
        kernel.set_max_isa(args.isa)
    torch.manual_seed(0)
    w = (torch.randn(*args.shape) * 0.02).to(getattr(torch, args.dtype))
    print(
        f"weight {tuple(w.shape)} {w.dtype}, block {args.block}, double quant, "
        f"threads {torch.get_num_threads()}, min of {args.rounds} interleaved rounds"
    )
    quant, deq = _peers(w, args.block)
    for title, fns in (("quantize", quant), ("dequantize", deq)):
        if args.only and args.only != title:
            continue
        best = _bench(fns, args.rounds)
        ours = best["deltatune"]
        print(f"\n{title}:")
        for name, t in best.items():
            print(f"  {name:22s} {t * 1e3:9.2f} ms   deltatune/this = {ours / t:6.3f}")
    print()


if __name__ == "__main__":
    main()
