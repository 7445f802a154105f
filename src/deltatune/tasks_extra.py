"""Two more built-in tasks, generated from a seed like :mod:`deltatune.tasks`, with output
contracts a small instruct model does not follow unprompted (so they score low before training and
the adapters that learn them are distinct — what adapter composition needs to be measured on):

* ``sentiment``: a short product review → exactly ``positive`` or ``negative`` (lower case, one
  word). Polarity comes from the opinion words; a negated phrase ("not great") flips it.
      "The blender arrived on Monday. Honestly, not worth the money." → negative
* ``dates``: a sentence with a date written in one of eight styles → the date as ISO 8601
  ``YYYY-MM-DD`` and nothing else.
      "We met on the 5th of March, 2021 at the station." → 2021-03-05

``TASKS`` maps each built-in task name (with the JSON-extraction task as ``extract``) to its
``make(num_train, num_eval, seed) -> (train, eval)`` function; records are chat-shaped and scored
with :func:`deltatune.tasks.exact_match`.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable
from typing import Any

from .tasks import make_task

__all__ = ["TASKS", "make_sentiment_task", "make_date_task", "SENTIMENT_PROMPT", "DATE_PROMPT"]

Record = dict[str, Any]

SENTIMENT_PROMPT = "Classify the sentiment of the review."
DATE_PROMPT = "Normalise the date in the text."

_PRODUCTS = ("blender", "headphones", "backpack", "kettle", "desk lamp", "phone case", "rain jacket", "coffee grinder",
             "keyboard", "water bottle", "tent", "toaster", "running shoes", "novel", "board game", "frying pan")
_OPENERS = ("The {p} arrived on {day}.", "I bought the {p} for my sister.", "Got this {p} last week.",
            "We have used the {p} for a month now.", "Ordered the {p} after reading the reviews.", "")
_POS = ("works perfectly", "is excellent value", "exceeded my expectations", "is a joy to use", "is really well made",
        "was worth every penny", "does exactly what it promises", "is the best purchase I made this year")
_NEG = ("broke after two days", "is a waste of money", "was a big disappointment", "stopped working quickly",
        "feels cheap and flimsy", "is not what was advertised", "made me regret buying it", "arrived damaged")
_NEG_OF_POS = ("is not worth the money", "is not well made at all", "did not live up to the hype",
               "is not as good as they say")
_POS_OF_NEG = ("is not flimsy at all", "never gave me a single problem", "is not a waste of money, quite the opposite",
               "did not disappoint")
_CLOSERS = ("", " Would buy again.", " Shipping was slow though.", " The box was plain.", " Five stars from me.",
            " One star.", " My kids noticed too.")
_DAYS = ("Monday", "Tuesday", "Friday", "Sunday")


def _review(rng: random.Random, positive: bool) -> str:
    p = rng.choice(_PRODUCTS)
    kind = rng.random()
    if positive:
        core = rng.choice(_POS) if kind < 0.75 else rng.choice(_POS_OF_NEG)
        closer = rng.choice([c for c in _CLOSERS if "One star" not in c])
    else:
        core = rng.choice(_NEG) if kind < 0.75 else rng.choice(_NEG_OF_POS)
        closer = rng.choice([c for c in _CLOSERS if "Five stars" not in c and "buy again" not in c])
    opener = rng.choice(_OPENERS).format(p=p, day=rng.choice(_DAYS))
    subject = "It" if opener else f"The {p}"
    return " ".join(s for s in (opener, f"{subject} {core}.{closer}") if s)


def make_sentiment_task(num_train: int = 320, num_eval: int = 40, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Deterministic (train, eval) review records, balanced positive/negative; no review text of the
    eval split occurs in the training split."""
    rng = random.Random(seed + 1000)
    seen: set[str] = set()
    records: list[Record] = []
    attempts = 0
    while len(records) < num_train + num_eval:
        attempts += 1
        if attempts > 100 * (num_train + num_eval) + 1000:
            raise ValueError(f"make_sentiment_task: cannot draw {num_train + num_eval} distinct reviews")
        positive = len(records) % 2 == 0
        text = _review(rng, positive)
        if text in seen:
            continue
        seen.add(text)
        records.append({"messages": [{"role": "system", "content": SENTIMENT_PROMPT},
                                     {"role": "user", "content": text},
                                     {"role": "assistant", "content": "positive" if positive else "negative"}]})
    rng.shuffle(records)
    return records[:num_train], records[num_train:]


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


_DATE_STYLES: tuple[Callable[[int, int, int], str], ...] = (
    lambda y, m, d: f"{calendar.month_name[m]} {d}, {y}",
    lambda y, m, d: f"{d} {calendar.month_name[m]} {y}",
    lambda y, m, d: f"the {_ordinal(d)} of {calendar.month_name[m]}, {y}",
    lambda y, m, d: f"{calendar.month_abbr[m]} {d} {y}",
    lambda y, m, d: f"{d} {calendar.month_abbr[m]}. {y}",
    lambda y, m, d: f"{calendar.month_name[m]} {_ordinal(d)} {y}",
    lambda y, m, d: f"{d}.{m}.{y} (day.month.year)",
    lambda y, m, d: f"{calendar.day_name[calendar.weekday(y, m, d)]}, {calendar.month_name[m]} {d}, {y}",
)
_DATE_SENTENCES = ("We met on {date} at the station.", "The contract was signed on {date}.",
                   "Her flight leaves {date}, early in the morning.", "Invoice due: {date}.",
                   "On {date} the museum reopened after repairs.", "{date} is when the festival starts.",
                   "I think the package was shipped on {date}.", "The meeting moved to {date}.")


def make_date_task(num_train: int = 320, num_eval: int = 40, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Deterministic (train, eval) records; every date occurs once across both splits."""
    rng = random.Random(seed + 2000)
    seen: set[tuple[int, int, int]] = set()
    records: list[Record] = []
    while len(records) < num_train + num_eval:
        y, m = rng.randint(1950, 2035), rng.randint(1, 12)
        d = rng.randint(1, calendar.monthrange(y, m)[1])
        if (y, m, d) in seen:
            continue
        seen.add((y, m, d))
        text = rng.choice(_DATE_SENTENCES).format(date=rng.choice(_DATE_STYLES)(y, m, d))
        records.append({"messages": [{"role": "system", "content": DATE_PROMPT},
                                     {"role": "user", "content": text[0].upper() + text[1:]},
                                     {"role": "assistant", "content": f"{y:04d}-{m:02d}-{d:02d}"}]})
    return records[:num_train], records[num_train:]


#: built-in task name → make(num_train, num_eval, seed) -> (train records, eval records)
TASKS: dict[str, Callable[[int, int, int], tuple[list[Record], list[Record]]]] = {
    "extract": make_task,
    "sentiment": make_sentiment_task,
    "dates": make_date_task,
}
