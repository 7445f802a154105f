"""Everything a run needs from its data section: :func:`prepare_data`; reference text for the 4-bit merge report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from deltatune.tasks import make_task

from .batching import collate
from .records import (
    _MAX_REPORTED,
    DataError,
    LoadedExamples,
    Message,
    Tokenized,
    examples_from_records,
    load_examples,
)
from .tokenize import pack_examples, prompt_and_reference, tokenize_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from deltatune.train.config import DataConfig

__all__ = ["PreparedData", "data_report", "prepare_data", "reference_batches"]

# ---------------------------------------------------------------------------------------------
# Everything for a run


@dataclass
class PreparedData:
    """Tokenised train/eval rows plus what a run report should say about the data."""

    train: list[Tokenized]
    eval: list[Tokenized]
    eval_prompts: list[list[Message]]  # generation inputs for exact-match eval
    eval_references: list[str]
    format: str
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    dropped_sources: list[str] = field(default_factory=list)  # the first few, file:line
    max_length: int = 0


def _builtin(records: list[dict[str, Any]], split: str) -> LoadedExamples:
    return examples_from_records(
        [(f"<built-in task> ({split} {i})", r) for i, r in enumerate(records)], "chat"
    )


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    """Load (or generate, for the built-in task), tokenise, optionally pack the training rows.
    Eval rows are never packed, so per-example eval loss stays clean."""
    evals: LoadedExamples | None = None
    if cfg.train_file is None:
        train_recs, eval_recs = make_task(cfg.num_train, cfg.num_eval, cfg.seed)
        train = _builtin(train_recs, "train")
        evals = _builtin(eval_recs, "eval") if eval_recs else None
    else:
        train = load_examples(cfg.train_file, cfg.format, skip_bad_records=cfg.skip_bad_records)
        if cfg.eval_file is not None:
            eval_fmt = cfg.format if cfg.format != "auto" else train.format  # one dataset, one shape
            evals = load_examples(cfg.eval_file, eval_fmt, skip_bad_records=cfg.skip_bad_records)
    dropped_sources: list[str] = []
    train_rows, truncated, dropped = tokenize_examples(
        train.examples, tokenizer, cfg.max_length, cfg.completion_only_loss, dropped_sources
    )
    if not train_rows:
        raise DataError(
            f"{cfg.train_file}: no training example has a loss token left within data.max_length={cfg.max_length} "
            f"(all {dropped} dropped, e.g. {', '.join(dropped_sources[:3])}): raise data.max_length"
        )
    eval_rows: list[Tokenized] = []
    pairs = []
    if evals is not None:
        eval_rows, t2, d2 = tokenize_examples(
            evals.examples, tokenizer, cfg.max_length, cfg.completion_only_loss, dropped_sources
        )
        truncated, dropped = truncated + t2, dropped + d2
        pairs = [p for p in map(prompt_and_reference, evals.examples) if p is not None]
    skipped_messages = train.skipped_messages + (evals.skipped_messages if evals else [])
    return PreparedData(
        train=pack_examples(train_rows, cfg.max_length) if cfg.packing else train_rows,
        eval=eval_rows,
        eval_prompts=[p for p, _ in pairs],
        eval_references=[r for _, r in pairs],
        format=train.format,
        skipped=train.skipped + (evals.skipped if evals else 0),
        skipped_messages=skipped_messages[:_MAX_REPORTED],
        truncated=truncated,
        dropped=dropped,
        dropped_sources=dropped_sources[:_MAX_REPORTED],
        max_length=cfg.max_length,
    )


def data_report(data: PreparedData, shown: int = 3) -> tuple[str, list[str]]:
    """The run log's data line, and warnings that name what was lost: records skipped as malformed,
    records dropped because no loss token fits in max_length, rows truncated — with the first
    ``shown`` locations (file:line), so nothing vanishes silently."""
    line = (f"data: {len(data.train)} train rows, {len(data.eval)} eval rows (format {data.format}, "
            f"{data.skipped} skipped, {data.dropped} dropped, {data.truncated} truncated)")
    warnings: list[str] = []
    if data.skipped:
        warnings.append(f"{data.skipped} malformed record(s) skipped (data.skip_bad_records), e.g. "
                        + "; ".join(data.skipped_messages[:shown]))
    if data.dropped:
        warnings.append(f"{data.dropped} record(s) dropped: no loss token within data.max_length="
                        f"{data.max_length} tokens (the answer starts after the limit), e.g. "
                        + ", ".join(data.dropped_sources[:shown]) + "; raise data.max_length to keep them")
    if data.truncated:
        warnings.append(f"{data.truncated} record(s) truncated to data.max_length={data.max_length} tokens")
    return line, warnings



def reference_batches(
    tokenizer: Any,
    data: str | Path | None = None,
    *,
    max_length: int = 256,
    batch_size: int = 4,
    num_examples: int = 16,
) -> list[dict[str, torch.Tensor]]:
    """Reference text for :func:`merge_error_report`: the first ``num_examples`` records of a data
    file (any format ``deltatune.train.data`` reads), or of the built-in task's held-out split;
    every token is scored (not only completions)."""
    if data is not None:
        examples = load_examples(Path(data)).examples[:num_examples]
    else:
        _, recs = make_task()  # the default run's held-out split: never trained on
        recs = recs[:num_examples]
        examples = examples_from_records([(f"<built-in task> (eval {i})", r) for i, r in enumerate(recs)], "chat").examples
    rows, _, _ = tokenize_examples(examples, tokenizer, max_length, completion_only_loss=False)
    if not rows:
        raise ValueError(f"{data or 'built-in task'}: no reference text")
    pad = tokenizer.pad_token_id
    return [collate(cast(Any, rows[i : i + batch_size]), pad) for i in range(0, len(rows), batch_size)]
