"""Training data: read user files, normalise record shapes, tokenise with the chat template, mask
prompts, pack, collate, and a deterministic resumable batch order.

Files: JSONL, JSON (a list, or ``{"data": [...]}``), CSV, Parquet. Record shapes:

==========  ====================================================================
text        ``{"text": ...}``                      loss on every token
alpaca      ``{"instruction", "input"?, "output", "system"?}``  → user/assistant turns
chat        ``{"messages": [{"role", "content"}, ...]}``  roles system/user/assistant
sharegpt    ``{"conversations": [{"from", "value"}, ...]}``  human→user, gpt→assistant
==========  ====================================================================

A malformed record is a :class:`DataError` naming ``file:line`` (JSONL, CSV) or
``file (record i)`` (JSON, Parquet; 0-based) and what is wrong — or, with
``skip_bad_records``, it is skipped and counted.

Loss masking (``completion_only_loss``): the conversation is rendered with the tokenizer's own
chat template; for each assistant turn *i* the answer's character span is
``[len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))`` — the
template decides where the answer starts, we never guess. Tokens whose first character falls in
a span are trained on (every assistant turn of a multi-turn chat is); all others get -100.
Templates that re-render earlier turns differently once later turns exist (e.g. dropping past
"thinking") cannot be masked this way and raise a clear error instead of masking wrongly.
"""

from __future__ import annotations

import csv
import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from deltatune.tasks import make_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from deltatune.train.config import DataConfig

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataError",
    "Example",
    "LoadedExamples",
    "PreparedData",
    "Tokenized",
    "collate",
    "count_loss_tokens",
    "data_report",
    "detect_format",
    "epoch_batches",
    "epoch_order",
    "examples_from_records",
    "load_examples",
    "pack_examples",
    "prepare_data",
    "prompt_and_reference",
    "read_records",
    "tokenize_example",
    "tokenize_examples",
]

IGNORE_INDEX = -100  # label value ignored by torch.nn.functional.cross_entropy
FORMATS: tuple[str, ...] = ("text", "alpaca", "chat", "sharegpt")
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
_MAX_REPORTED = 20  # skipped-record messages kept for the run report

Message = dict[str, str]


class DataError(ValueError):
    """A data problem; the message starts with the location (``file:line`` or ``file (record i)``)."""


class Tokenized(TypedDict):
    input_ids: list[int]
    labels: list[int]


@dataclass
class Example:
    """One normalised record: chat ``messages`` or plain ``text`` (exactly one is set)."""

    source: str
    messages: list[Message] | None = None
    text: str | None = None


@dataclass
class LoadedExamples:
    examples: list[Example]
    format: str
    skipped: int = 0
    skipped_messages: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading files → (source, raw record)


def read_records(
    path: str | Path, *, skip_bad_records: bool = False
) -> tuple[list[tuple[str, Any]], list[str]]:
    """Raw records with their locations, plus the messages of skipped unreadable records.

    Only per-record problems (a bad JSONL line, a ragged CSV row) are skippable; a JSON file
    that does not parse, or an unsupported extension, is always an error."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory; expected a data file (.jsonl, .json, .csv or .parquet)")
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p, skip_bad_records)
    if suffix == ".json":
        return _read_json(p), []
    if suffix in (".csv", ".tsv"):
        return _read_csv(p, skip_bad_records, delimiter="\t" if suffix == ".tsv" else ",")
    if suffix in (".parquet", ".pq"):
        return _read_parquet(p), []
    raise DataError(f"{p}: unsupported data file type {suffix!r}: use .jsonl, .json, .csv or .parquet")


def _read_jsonl(p: Path, skip: bool) -> tuple[list[tuple[str, Any]], list[str]]:
    out: list[tuple[str, Any]] = []
    bad: list[str] = []
    for n, raw in enumerate(p.read_bytes().splitlines(), start=1):
        where = f"{p}:{n}"
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            if not line.strip():
                continue  # blank lines (often a trailing one) are not records
            out.append((where, json.loads(line)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            reason = (
                "not valid UTF-8"
                if isinstance(e, UnicodeDecodeError)
                else f"invalid JSON: {e.msg} (column {e.colno})"
            )
            if not skip:
                raise DataError(f"{where}: {reason}") from None
            bad.append(f"{where}: {reason}")
    return out, bad


def _read_json(p: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(p.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except UnicodeDecodeError:
        raise DataError(f"{p}: not valid UTF-8") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f'{p}: a .json data file must hold a list of records or {{"data": [...]}}')
    return [(f"{p} (record {i})", rec) for i, rec in enumerate(data)]


def _read_csv(p: Path, skip: bool, delimiter: str) -> tuple[list[tuple[str, Any]], list[str]]:
    out: list[tuple[str, Any]] = []
    bad: list[str] = []
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{p}: not valid UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    start = 2  # line 1 is the header
    for row in reader:
        where = f"{p}:{start}"
        start = reader.line_num + 1  # a quoted cell may span lines
        problem = None
        if None in row:
            problem = f"{len(reader.fieldnames or []) + len(row[None])} cells, more than the {len(reader.fieldnames or [])} header columns"  # type: ignore[index]
        elif any(v is None for v in row.values()):
            problem = "fewer cells than header columns"
        if problem is not None:
            if not skip:
                raise DataError(f"{where}: {problem}")
            bad.append(f"{where}: {problem}")
            continue
        out.append((where, dict(row)))
    return out, bad


def _read_parquet(p: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    rows = pq.read_table(p).to_pylist()
    return [(f"{p} (record {i})", rec) for i, rec in enumerate(rows)]


# ---------------------------------------------------------------------------------------------
# Normalising record shapes → Example


def detect_format(record: Any, source: str = "<record>") -> str:
    """The format implied by a record's keys: messages → chat, conversations → sharegpt,
    instruction → alpaca, text → text."""
    if not isinstance(record, Mapping):
        raise DataError(f"{source}: expected a JSON object (a mapping of keys), got {type(record).__name__}")
    for key, fmt in (
        ("messages", "chat"),
        ("conversations", "sharegpt"),
        ("instruction", "alpaca"),
        ("text", "text"),
    ):
        if key in record:
            return fmt
    raise DataError(
        f"{source}: cannot detect the data format from keys {sorted(map(str, record))}: expected 'text', "
        "'instruction'+'output' (alpaca), 'messages' (chat) or 'conversations' (sharegpt); or set data.format"
    )


def _str_field(rec: Mapping[str, Any], key: str, source: str, *, required: bool) -> str:
    if key not in rec or rec[key] is None:
        if required and key in rec:
            raise DataError(f"{source}: '{key}' is null; expected a string")
        if required:
            raise DataError(f"{source}: missing key '{key}' (keys present: {sorted(map(str, rec))})")
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{source}: '{key}' is empty")
    return value


def _list_field(rec: Mapping[str, Any], key: str, source: str) -> list[Any]:
    if key not in rec or rec[key] is None:
        if key in rec:
            raise DataError(f"{source}: '{key}' is null; expected a non-empty list of turns")
        raise DataError(f"{source}: missing key '{key}' (keys present: {sorted(map(str, rec))})")
    value = rec[key]
    if isinstance(value, str):  # CSV cells hold nested data as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: '{key}' is a string that is not valid JSON: {e.msg}") from None
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{source}: '{key}' must be a non-empty list of turns, got {type(value).__name__} {value!r:.60}"
        )
    return value


def _check_turns(messages: list[Message], source: str, key: str) -> None:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{source}: '{key}' has no assistant turn, so there is nothing to learn")
    first = roles.index("assistant")
    if "user" not in roles[:first]:
        raise DataError(f"{source}: '{key}' turn {first} is an assistant turn with no user turn before it")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{source}: '{key}' turn {i} is an empty assistant message")


def _normalize(rec: Any, fmt: str, source: str) -> Example:
    if not isinstance(rec, Mapping):
        raise DataError(f"{source}: expected a JSON object (a mapping of keys), got {type(rec).__name__}")
    if fmt == "text":
        return Example(source, text=_str_field(rec, "text", source, required=True))
    if fmt == "alpaca":
        instruction = _str_field(rec, "instruction", source, required=True)
        inp = _str_field(rec, "input", source, required=False)
        output = _str_field(rec, "output", source, required=True)
        system = _str_field(rec, "system", source, required=False)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return Example(source, messages=messages)
    if fmt in ("chat", "sharegpt"):
        key, role_key, text_key = (
            ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
        )
        messages = []
        for i, turn in enumerate(_list_field(rec, key, source)):
            where = f"{source}: '{key}' turn {i}"
            if not isinstance(turn, Mapping):
                raise DataError(
                    f"{where} must be an object with '{role_key}' and '{text_key}', got {type(turn).__name__}"
                )
            role, content = turn.get(role_key), turn.get(text_key)
            if not isinstance(role, str) or not isinstance(content, str):
                raise DataError(f"{where} needs string '{role_key}' and '{text_key}', got {dict(turn)!r:.80}")
            if fmt == "sharegpt":
                if role.lower() not in _SHAREGPT_ROLES:
                    raise DataError(f"{where} has unknown 'from' {role!r} (expected human, gpt or system)")
                role = _SHAREGPT_ROLES[role.lower()]
            elif role not in _ROLES:
                raise DataError(f"{where} has unknown role {role!r} (expected {', '.join(_ROLES)})")
            messages.append({"role": role, "content": content})
        _check_turns(messages, source, key)
        return Example(source, messages=messages)
    raise DataError(f"{source}: unknown data format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")


def examples_from_records(
    records: Sequence[tuple[str, Any]], fmt: str = "auto", *, skip_bad_records: bool = False
) -> LoadedExamples:
    """Normalise ``(source, record)`` pairs; ``fmt='auto'`` detects from the first object record."""
    if fmt == "auto":
        first = next(((s, r) for s, r in records if isinstance(r, Mapping)), None)
        if first is None:
            raise DataError(
                f"{records[0][0] if records else '<data>'}: no records to detect the data format from"
            )
        fmt = detect_format(first[1], first[0])
    out = LoadedExamples([], fmt)
    for source, rec in records:
        try:
            out.examples.append(_normalize(rec, fmt, source))
        except DataError as e:
            if not skip_bad_records:
                raise
            _note_skip(out, str(e))
    return out


def _note_skip(out: LoadedExamples, message: str) -> None:
    out.skipped += 1
    if len(out.skipped_messages) < _MAX_REPORTED:
        out.skipped_messages.append(message)


def load_examples(path: str | Path, fmt: str = "auto", *, skip_bad_records: bool = False) -> LoadedExamples:
    """Read and normalise a data file. With ``skip_bad_records`` the result counts what was skipped."""
    records, unreadable = read_records(path, skip_bad_records=skip_bad_records)
    if not records:
        raise DataError(f"{path}: no records" + (f" ({len(unreadable)} unreadable)" if unreadable else ""))
    out = examples_from_records(records, fmt, skip_bad_records=skip_bad_records)
    for msg in unreadable:
        _note_skip(out, msg)
    if not out.examples:
        raise DataError(f"{path}: every record was malformed; first problem: {out.skipped_messages[0]}")
    return out


# ---------------------------------------------------------------------------------------------
# Tokenising with prompt masking


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], gen_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, ex: Example, full: str
) -> list[tuple[int, int]]:
    assert ex.messages is not None
    spans = []
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, ex.messages[:i], gen_prompt=True)
        through = _render(tokenizer, ex.messages[: i + 1], gen_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"{ex.source}: cannot locate assistant turn {i} for loss masking: the tokenizer's chat template "
                "renders earlier turns differently once later turns are added. Set data.completion_only_loss=false "
                "to train on all tokens, or use a template that renders conversations prefix-consistently"
            )
        spans.append((len(before), len(through)))
    return spans


def _token_mask(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], source: str
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether its first character lies in a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return ids, [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    except NotImplementedError:  # slow (Python) tokenizers have no offsets: compare prefix lengths
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        mask = [False] * len(ids)
        for s, e in spans:
            lo, hi = (len(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (s, e))
            if ids[:hi] != list(tokenizer(text[:e], add_special_tokens=False)["input_ids"]):
                raise DataError(
                    f"{source}: the tokenizer merges tokens across the prompt/answer boundary, so the answer "
                    "cannot be masked exactly; set data.completion_only_loss=false"
                ) from None
            mask[lo:hi] = [True] * (hi - lo)
        return ids, mask


def tokenize_example(
    ex: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, completion_only_loss: bool = True
) -> Tokenized:
    """``input_ids`` and ``labels`` (same length ≤ max_length; -100 where no loss is taken).

    Text: the tokenizer's own special tokens plus eos, loss everywhere. Chat: the chat template
    (which already contains the special tokens), loss on assistant turns only when
    ``completion_only_loss``."""
    if ex.text is not None:
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if isinstance(eos, int) and (not ids or ids[-1] != eos):
            ids.append(eos)  # the model must learn where a document ends
        labels = list(ids)
    else:
        assert ex.messages is not None
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{ex.source}: the tokenizer has no chat template, so chat/alpaca data cannot be rendered; "
                "use a chat model or data.format=text"
            )
        full = _render(tokenizer, ex.messages, gen_prompt=False)
        if completion_only_loss:
            ids, mask = _token_mask(tokenizer, full, _assistant_char_spans(tokenizer, ex, full), ex.source)
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        else:
            ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
            labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    completion_only_loss: bool = True,
    dropped_sources: list[str] | None = None,
) -> tuple[list[Tokenized], int, int]:
    """Tokenise all; returns ``(rows, truncated, dropped)``: ``truncated`` counts kept rows that were
    cut to max_length; ``dropped`` counts examples left with no loss token (a prompt longer than
    max_length, say), which are removed rather than trained on as pure padding. Their locations
    (``file:line``) are appended to ``dropped_sources`` when given, for the run's data report."""
    rows: list[Tokenized] = []
    truncated = dropped = 0
    for ex in examples:
        row = tokenize_example(ex, tokenizer, max_length + 1, completion_only_loss)
        was_cut = len(row["input_ids"]) > max_length
        row = {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}
        # labels[0] never counts: position 0 has no previous token to predict it from.
        if all(t == IGNORE_INDEX for t in row["labels"][1:]):
            dropped += 1
            if dropped_sources is not None:
                dropped_sources.append(ex.source)
            continue
        truncated += was_cut
        rows.append(row)
    return rows, truncated, dropped


def pack_examples(rows: Sequence[Tokenized], max_length: int) -> list[Tokenized]:
    """Greedy, order-preserving packing: append whole examples to a row while they fit in
    ``max_length`` tokens, else start a new row. Labels keep their masking.

    Caveat: with ordinary (SDPA/eager) attention, tokens attend across example boundaries inside a
    row; the examples are independent, so this is mild noise that packing trades for fewer pad
    tokens. Exact isolation needs per-example position_ids with a varlen (flash) kernel."""
    packed: list[Tokenized] = []
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        if len(row["input_ids"]) > max_length:
            raise ValueError(
                f"pack_examples: a row of {len(row['input_ids'])} tokens exceeds max_length={max_length}"
            )
        if ids and len(ids) + len(row["input_ids"]) > max_length:
            packed.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids.extend(row["input_ids"])
        labels.extend(row["labels"])
    if ids:
        packed.append({"input_ids": ids, "labels": labels})
    return packed


def prompt_and_reference(ex: Example) -> tuple[list[Message], str] | None:
    """For generation-based eval: the messages before the last assistant turn, and that turn's
    text. ``None`` for plain-text examples (nothing to generate against)."""
    if ex.messages is None:
        return None
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return [dict(m) for m in ex.messages[:last]], ex.messages[last]["content"]


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


# ---------------------------------------------------------------------------------------------
# Batching


def collate(
    batch: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int | None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 1 on real tokens. All (B, T) int64."""
    if pad_token_id is None:
        raise ValueError(
            "collate: the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)"
        )
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        if len(r["labels"]) != n:
            raise ValueError(f"collate: row {i} has {n} input_ids but {len(r['labels'])} labels")
        ids[i, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(r["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def count_loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens that contribute to the causal-LM loss: labels ≠ -100 after the one-position shift
    (``labels[:, 1:]``). The loop sums per-token losses over a whole accumulation window and
    divides by this total, so every token weighs the same whatever the batch it landed in."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum().item())


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on (n, seed, epoch): a resumed run recomputes
    the same order and skips the batches it already consumed."""
    order = list(range(n))
    # A string seed goes through SHA-512 in `random`, independent of PYTHONHASHSEED and platform.
    random.Random(f"deltatune:{seed}:{epoch}").shuffle(order)
    return order


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, *, drop_last: bool = False
) -> list[list[int]]:
    """:func:`epoch_order` cut into batches of ``batch_size`` indices (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1, got {batch_size}")
    order = epoch_order(n, seed, epoch)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches
