"""Regularisers against forgetting, as training hooks (``train/hooks.py``): EWC, L2-SP, KL to the base.

:func:`build` is what ``deltatune.train.hooks.regularisers`` returns: one hook per penalty whose
``regularize.<name>.weight`` is > 0, in the order ewc, l2sp, kl. Each reads its own config section
(:mod:`deltatune.regularize.config`); data come from the objective (its collate / loss_sum /
weight, so the Fisher is the objective's own loss) and from the forgetting reference set.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from .config import EwcConfig, KlConfig, L2spConfig, RegularizeConfig
from .sites import sites

__all__ = ["EwcConfig", "KlConfig", "L2spConfig", "RegularizeConfig", "build", "report", "adapter_method"]


def adapter_method(cfg: Any) -> bool:
    """True when the method leaves the base weights untouched (disable_adapters gives the base)."""
    from ..registry import get_method

    return get_method(cfg.method).saves == "adapter"


def _total_steps(cfg: Any, splits: Any) -> int:  # the loop's own formula (train/loop.py)
    from ..train.replay import batch_plan

    per_epoch = max(1, len(batch_plan(cfg, splits, 0)) // cfg.train.grad_accum)
    return cfg.train.max_steps if cfg.train.max_steps > 0 else per_epoch * cfg.train.epochs


def _spread(rows: Sequence[Any], k: int) -> list[Any]:
    """k rows evenly spread over ``rows`` (deterministic; all of them when k ≥ len)."""
    n = len(rows)
    return list(rows) if k >= n else [rows[i * n // k] for i in range(k)]


def _tokenizer(objective: Any, what: str) -> Any:
    tok = getattr(objective, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{what} needs text rows, but objective {type(objective).__name__} has no tokenizer: "
                         "use 'train' / 'eval' data or a fisher_file")
    return tok


def _fisher_rows(cfg: Any, objective: Any, splits: Any) -> list[Any]:
    src = cfg.regularize.ewc.data
    if src == "train":
        rows: Sequence[Any] = splits.train
    elif src == "eval":
        rows = splits.eval
    else:
        tok = _tokenizer(objective, f"regularize.ewc.data={src!r}")
        if src == "reference":
            from ..train.reference import reference_rows

            rows = reference_rows(cfg.forgetting, tok)
        else:
            from ..data import load_examples, tokenize_examples

            rows = tokenize_examples(load_examples(src).examples, tok, cfg.data.max_length)[0]
    if not rows:
        raise ValueError(f"regularize.ewc.data={src!r}: no rows to estimate the Fisher from")
    return _spread(rows, cfg.regularize.ewc.samples)


def build(cfg: Any, objective: Any, model: nn.Module, splits: Any, *, progress: bool = False,
          resuming: bool = False) -> list[Any]:
    """The regularisation hooks ``cfg.regularize`` asks for (none when every weight is 0).
    ``resuming``: the run continues from a checkpoint, which holds EWC's Fisher and θ*."""
    reg: RegularizeConfig | None = getattr(cfg, "regularize", None)
    if reg is None:
        return []
    hooks: list[Any] = []
    def loss_fn(m: nn.Module, b: dict[str, Any]) -> Any:
        return objective.loss_sum(m, b) / max(1, objective.weight(b))

    if reg.ewc.weight > 0:
        from .ewc import EwcHook

        rows = [] if reg.ewc.fisher_file or resuming else _fisher_rows(cfg, objective, splits)
        n_target = (splits.info.get("replay") or {}).get("target_rows", len(splits.train))  # replay rows last
        train_rows = _spread(list(splits.train)[:n_target], reg.ewc.samples)

        def batches(rows: list[Any] = rows) -> Iterator[dict[str, Any]]:
            return (objective.collate([r]) for r in rows)

        hooks.append(EwcHook.create(
            reg.ewc, sites(model, "regularize.ewc"), batches, loss_fn, model, seed=cfg.train.seed,
            samples_total=len(rows), total_steps=_total_steps(cfg, splits),
            online_batches=lambda: (objective.collate([r]) for r in train_rows), progress=progress,
            resuming=resuming))
    if reg.l2sp.weight > 0:
        from .l2sp import L2spHook

        hooks.append(L2spHook(reg.l2sp, sites(model, "regularize.l2sp")))
    if reg.kl.weight > 0:
        from ..train.reference import reference_rows
        from .kl import KlHook

        tok = _tokenizer(objective, "regularize.kl")
        pad = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        hooks.append(KlHook(reg.kl, reference_rows(cfg.forgetting, tok), pad, adapters=adapter_method(cfg),
                            model=model, top_k=cfg.forgetting.top_k))
    return hooks


def report(hooks: Sequence[Any]) -> dict[str, Any]:
    """summary.json's ``regularize`` entry: what each regularising hook did (estimator, samples, time)."""
    from .ewc import EwcHook
    from .kl import KlHook
    from .l2sp import L2spHook

    return {h.name: h.report() for h in hooks if isinstance(h, EwcHook | L2spHook | KlHook)}
