"""Labelled text for sequence classification: records → (text, optional text pair, label id).

Files are read by :func:`deltatune.train.data.read_records` (JSONL, JSON, CSV, Parquet), so a
location is always ``file:line`` (JSONL, CSV) or ``file (record i)`` (JSON, Parquet, 0-based).

Labels may be strings or integers (CSV cells are always strings, so ``1`` and ``"1"`` are the
same label). The label set is read from the *training* data and fixed in a :class:`LabelMap`:
when every label is an integer the ids are the labels in numeric order (labels 0..K-1 keep
their values), otherwise the names in sorted order. The map is saved with the model
(``config.id2label`` / ``label2id``); a label in the eval data that training never saw is an
error naming its location.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .records import DataError, read_records

__all__ = ["ClassifyConfig", "LabelMap", "LabelledExample", "label_key", "label_map_from_id2label",
           "labelled_from_records", "load_labelled", "read_label_map"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class ClassifyConfig:
    """Sequence classification (objective 'classify'): which record fields hold text and label."""

    text_field: str = field(default="text", metadata=_doc("Record key of the text to classify."))
    label_field: str = field(default="label", metadata=_doc("Record key of the label (a string or an integer)."))
    text_pair_field: str | None = field(
        default=None,
        metadata=_doc("Record key of a second text (NLI-style pairs: premise/hypothesis); null = single texts."),
    )
    max_length: int = field(
        default=128, metadata=_doc("Tokens per example (pair: both texts together); longer ones are truncated.")
    )
    num_train: int = field(
        default=2400, metadata=_doc("Built-in topic task only (data.train_file null): training examples (≤ 8135).")
    )
    num_eval: int = field(
        default=600, metadata=_doc("Built-in topic task only: held-out examples (≤ 898; a fixed split).")
    )

    def __post_init__(self) -> None:
        for name in ("text_field", "label_field"):
            if not str(getattr(self, name)).strip():
                raise ValueError(f"classify.{name} is empty: give the record key")
        if self.text_pair_field is not None and self.text_pair_field in (self.text_field, self.label_field):
            raise ValueError(f"classify.text_pair_field={self.text_pair_field!r} repeats text_field/label_field")
        if self.max_length < 4:
            raise ValueError(f"classify.max_length must be >= 4 tokens, got {self.max_length}")
        if self.num_train < 1 or self.num_eval < 0:
            raise ValueError(f"classify.num_train must be >= 1 and num_eval >= 0, got {self.num_train}, {self.num_eval}")


@dataclass
class LabelledExample:
    source: str  # file:line or file (record i)
    text: str
    label: str  # the label's key (see label_key)
    text_pair: str | None = None


def label_key(value: Any, source: str, key: str) -> str:
    """A label as the string that identifies it: ints and their decimal strings are one label."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(f"{source}: '{key}' must be a string or an integer label, got {type(value).__name__} "
                        f"{value!r:.40}")
    text = str(value).strip()
    if not text:
        raise DataError(f"{source}: '{key}' is empty")
    return text


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


@dataclass(frozen=True)
class LabelMap:
    """Label names in id order; ``names[i]`` is label id ``i``."""

    names: tuple[str, ...]

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> LabelMap:
        found = set(labels)
        if len(found) < 2:
            raise DataError(f"classification needs at least 2 labels in the training data, found {sorted(found)}")
        if all(_is_int(x) for x in found):
            return cls(tuple(sorted(found, key=int)))
        return cls(tuple(sorted(found)))

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, ex: LabelledExample) -> int:
        ids = self.label2id
        if ex.label not in ids:
            shown = ", ".join(repr(n) for n in self.names[:12]) + (" …" if len(self.names) > 12 else "")
            raise DataError(f"{ex.source}: label {ex.label!r} is not one of the {len(self.names)} labels of the "
                            f"training data ({shown})")
        return ids[ex.label]


def label_map_from_id2label(id2label: Mapping[Any, Any], where: str = "id2label") -> LabelMap:
    """A LabelMap from an ``id2label`` mapping (keys ints, or their strings as JSON writes them)."""
    pairs = sorted((int(k), str(v)) for k, v in dict(id2label).items())
    if [i for i, _ in pairs] != list(range(len(pairs))):
        raise ValueError(f"{where}: label ids are not 0..{len(pairs) - 1}: {dict(id2label)}")
    return LabelMap(tuple(v for _, v in pairs))


def read_label_map(config: Any) -> LabelMap:
    """The label map stored in an HF config (``config.id2label``)."""
    return label_map_from_id2label(getattr(config, "id2label", None) or {}, "config.id2label")


def _text(rec: Mapping[str, Any], key: str, source: str) -> str:
    if key not in rec or rec[key] is None:
        raise DataError(f"{source}: missing key '{key}' (keys present: {sorted(map(str, rec))})")
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{source}: '{key}' is empty")
    return value


def labelled_from_records(records: Sequence[tuple[str, Any]], cfg: ClassifyConfig) -> list[LabelledExample]:
    """``(source, record)`` pairs → examples; a bad record is a DataError naming its source."""
    out = []
    for source, rec in records:
        if not isinstance(rec, Mapping):
            raise DataError(f"{source}: expected an object with '{cfg.text_field}' and '{cfg.label_field}', "
                            f"got {type(rec).__name__}")
        if cfg.label_field not in rec or rec[cfg.label_field] is None:
            raise DataError(f"{source}: missing key '{cfg.label_field}' (keys present: {sorted(map(str, rec))}); "
                            "set classify.label_field")
        pair = _text(rec, cfg.text_pair_field, source) if cfg.text_pair_field else None
        out.append(LabelledExample(source, _text(rec, cfg.text_field, source),
                                   label_key(rec[cfg.label_field], source, cfg.label_field), pair))
    return out


def load_labelled(path: str | Path, cfg: ClassifyConfig) -> list[LabelledExample]:
    """Read a JSONL/JSON/CSV/Parquet file of labelled records."""
    records, _ = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    return labelled_from_records(records, cfg)

