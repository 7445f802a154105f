"""Reading data files (JSONL, JSON, CSV, Parquet) and normalising record shapes to :class:`Example`."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:

    pass

__all__ = ["FORMATS", "DataError", "Example", "LoadedExamples", "Message", "Tokenized", "detect_format",
           "examples_from_records", "load_examples", "read_records"]

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
