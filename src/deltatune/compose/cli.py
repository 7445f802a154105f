"""``deltatune compose``: combine adapter directories into a new PEFT-format LoRA adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "cmd_compose"]


def add_parser(sub: Any) -> None:
    from .combine import METHODS

    c = sub.add_parser(
        "compose", help="combine adapters that share a base into a new LoRA adapter (PEFT format)",
        description="Combine LoRA/VeRA/AdaLoRA adapters of one base model: ΔW = Σ λᵢ·sᵢ·BᵢAᵢ exactly "
                    "(cat, task_arithmetic), PEFT's add_weighted_adapter types with PEFT's semantics, or "
                    "DELLA/breadcrumbs. Negative weights subtract (write --weights=-1,1 when the first is negative).")
    c.add_argument("--adapter", action="append", required=True, metavar="DIR", help="an adapter directory (repeat)")
    c.add_argument("--weights", help="comma-separated λ per adapter (default: uniform 1/N)")
    c.add_argument("--method", default="task_arithmetic", choices=list(METHODS), metavar="NAME",
                   help=f"combination type: {', '.join(METHODS)} (default: task_arithmetic, exact)")
    c.add_argument("--density", type=float, help="fraction of entries kept (TIES, DARE, magnitude_prune, DELLA, breadcrumbs)")
    c.add_argument("--svd-rank", type=int, help="rank of the SVD types' result (default: the largest input rank, as PEFT)")
    c.add_argument("--svd-clamp", type=float, help="quantile at which to clamp the SVD factors (PEFT's svd_clamp)")
    c.add_argument("--majority-sign-method", default="total", choices=["total", "frequency"])
    c.add_argument("--seed", type=int, default=0, help="seed of DARE/DELLA's random masks")
    c.add_argument("--epsilon", type=float, default=0.1, help="DELLA: keep probability spread density ± epsilon")
    c.add_argument("--gamma", type=float, default=0.01, help="breadcrumbs: fraction of largest outliers dropped")
    c.add_argument("--model", help="base model (only needed for VeRA files that record no layer widths)")
    c.add_argument("--out", required=True, help="output directory (never one of the inputs)")


def cmd_compose(args: argparse.Namespace) -> int:
    from . import combine, format_report, read_adapter, save_composed

    dirs = [Path(d) for d in args.adapter]
    if args.weights is None:
        weights = [1.0 / len(dirs)] * len(dirs)
    else:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise ValueError(f"--weights {args.weights!r}: expected comma-separated numbers ({e})") from e
        if len(weights) != len(dirs):
            raise ValueError(f"--weights has {len(weights)} values for {len(dirs)} --adapter directories")
    shapes = _shapes(args.model) if args.model else None
    names = [str(d) for d in dirs]
    if len(set(names)) != len(names):
        raise ValueError(f"an --adapter directory is given twice: {names}")
    adapters = [read_adapter(d, shapes=shapes) for d in dirs]
    composed = combine(adapters, weights, args.method, density=args.density, svd_rank=args.svd_rank,
                       svd_clamp=args.svd_clamp, majority_sign_method=args.majority_sign_method, seed=args.seed,
                       epsilon=args.epsilon, gamma=args.gamma)
    out = save_composed(composed, args.out, inputs=list(dirs))
    print("\n".join(format_report(composed)))
    print(f"{args.method} of {len(dirs)} adapters (weights {', '.join(f'{w:g}' for w in weights)}) written to {out}")
    return 0


def _shapes(spec: str) -> dict[str, tuple[int, int]]:
    from ..methods.lora import base_shape, supported_base
    from ..models import load_model

    model, _ = load_model(spec)
    return {n: base_shape(m) for n, m in model.named_modules() if supported_base(m) in ("linear", "conv1d")}
