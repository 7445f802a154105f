"""The built-in default task: extract a person's details from an English sentence as JSON.

    "Maria Lopez, a 34-year-old nurse from Lisbon, volunteers at the library."
    → {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}

Why this task: it needs no download (generated from a seed), it is quick to score exactly, and
its *output contract* — these four keys, in this order, age as a JSON integer, the job in lower
case, ``json.dumps`` spacing, no code fence — is not stated anywhere in the prompt. A small
instruct model (SmolLM2-135M) answers with its own keys, prose or a fenced block, so it scores
~0 before training; a LoRA learns the contract from one epoch of ~320 examples. The sentence
templates and field orders vary so that copying spans by position does not work.

Records are chat-shaped (``{"messages": [system, user, assistant]}``) so the ordinary chat data
pipeline (deltatune.data) tokenises them like any user data.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "FIELDS",
    "SYSTEM_PROMPT",
    "exact_match",
    "make_task",
    "score_exact_match",
    "task_prompt",
    "task_reference",
]

Message = dict[str, str]
Record = dict[str, Any]

SYSTEM_PROMPT = "Extract the person's details from the text as JSON."
FIELDS: tuple[str, ...] = ("name", "age", "city", "job")

_FIRST = (
    "Maria", "James", "Aiko", "Lars", "Fatima", "Diego", "Chloe", "Omar", "Ingrid", "Kwame",
    "Sofia", "Mateo", "Priya", "Tomasz", "Amara", "Lucas", "Hana", "Ravi", "Elena", "Noah",
    "Yuki", "Marta", "Samuel", "Leila", "Pierre", "Zara", "Anton", "Nadia", "Felix", "Grace",
    "Hugo", "Irene", "Jonas", "Kira", "Liam", "Mei", "Nils", "Olga", "Pablo", "Rosa",
)  # fmt: skip
_LAST = (
    "Lopez", "Smith", "Tanaka", "Nilsson", "Haddad", "Fernandez", "Martin", "Farouk", "Berg", "Mensah",
    "Rossi", "Garcia", "Sharma", "Kowalski", "Okafor", "Dubois", "Kim", "Patel", "Popescu", "Weber",
    "Sato", "Novak", "Cohen", "Rahimi", "Laurent", "Ahmed", "Ivanov", "Petrova", "Schmidt", "Walsh",
    "Moreau", "Costa", "Jensen", "Horvat", "Murphy", "Chen", "Lindqvist", "Sokolova", "Ruiz", "Silva",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Toronto", "Osaka", "Bergen", "Beirut", "Valencia", "Lyon", "Cairo", "Oslo", "Accra",
    "Milan", "Seville", "Mumbai", "Krakow", "Lagos", "Marseille", "Busan", "Ahmedabad", "Bucharest", "Hamburg",
    "Kyoto", "Prague", "Haifa", "Tehran", "Bordeaux", "Karachi", "Kazan", "Varna", "Munich", "Dublin",
    "Nantes", "Porto", "Aarhus", "Zagreb", "Cork", "Chengdu", "Uppsala", "Minsk", "Bilbao", "Recife",
)  # fmt: skip
_JOBS = (
    "nurse", "teacher", "architect", "baker", "electrician", "pilot", "lawyer", "dentist", "carpenter",
    "librarian", "chemist", "journalist", "plumber", "engineer", "photographer", "accountant", "chef",
    "pharmacist", "translator", "veterinarian", "firefighter", "economist", "gardener", "optician",
    "software developer", "data analyst", "bus driver", "graphic designer", "civil engineer", "tailor",
)  # fmt: skip
_TAILS = (
    "enjoys hiking on weekends", "volunteers at the local library", "plays the cello in an amateur orchestra",
    "has two cats", "is learning to sail", "collects old maps", "runs a small podcast", "cycles to work",
)  # fmt: skip

# Each template mentions all four fields once, in different orders and phrasings. `{a_job}` is the
# job with its article ("an engineer"); the answer always uses the bare job.
_TEMPLATES = (
    "{name}, {a_job_aged} from {city}, {tail}.",
    "Meet {name}: {age} years old, works as {a_job} and lives in {city}.",
    "In {city}, {name} ({age}) has worked as {a_job} for years.",
    "{name} is {age} and works as {a_job} in {city}.",
    "The {job} {name}, aged {age}, moved to {city} last spring.",
    "Born {age} years ago, {name} now lives in {city}, working as {a_job}.",
    "Our new neighbour in {city} is {name}, {a_job} who just turned {age}.",
    "{Age_job} {name} lives in {city} and {tail}.",
    "Name: {name}. Lives in: {city}. Age: {age}. Occupation: {job}.",
    "According to the registry, {name} ({job}, {age}) resides in {city}.",
    "I spoke with {name} yesterday; the {age}-year-old {job} told me about life in {city}.",
    "{city} local {name} turned {age} this year and still works as {a_job}.",
)


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _sentence(rng: random.Random, name: str, age: int, city: str, job: str) -> str:
    template = rng.choice(_TEMPLATES)
    return template.format(
        name=name,
        age=age,
        city=city,
        job=job,
        a_job=f"{_article(job)} {job}",
        # "a 34-year-old nurse" / "an 81-…": the article follows the number's sound, not the job's.
        a_job_aged=f"{'an' if str(age)[0] == '8' or age in (11, 18) else 'a'} {age}-year-old {job}",
        Age_job=f"{age}-year-old {job}".capitalize(),
        tail=rng.choice(_TAILS),
    )


def _answer(name: str, age: int, city: str, job: str) -> str:
    # The fixed output format: key order FIELDS, json.dumps default separators, age an integer.
    return json.dumps({"name": name, "age": age, "city": city, "job": job}, ensure_ascii=False)


def make_task(num_train: int = 320, num_eval: int = 40, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Deterministic (train, eval) records for ``seed``. Every person's full name is unique across
    both splits, so no eval sentence or answer is seen in training."""
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"make_task: num_train and num_eval must be >= 0, got {num_train}, {num_eval}")
    people = [f"{f} {last}" for f in _FIRST for last in _LAST]
    total = num_train + num_eval
    if total > len(people):
        raise ValueError(
            f"make_task: at most {len(people)} examples in total (unique names), asked for {total}"
        )
    rng = random.Random(seed)
    rng.shuffle(people)
    records: list[Record] = []
    for name in people[:total]:
        age, city, job = rng.randint(19, 78), rng.choice(_CITIES), rng.choice(_JOBS)
        records.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": _sentence(rng, name, age, city, job)},
                    {"role": "assistant", "content": _answer(name, age, city, job)},
                ]
            }
        )
    return records[:num_train], records[num_train:]


def task_prompt(record: Mapping[str, Any]) -> list[Message]:
    """The messages to generate from: everything before the final assistant turn."""
    messages = list(record["messages"])
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("task_prompt: the record's last message must be the assistant's answer")
    return [dict(m) for m in messages[:-1]]


def task_reference(record: Mapping[str, Any]) -> str:
    """The reference answer: the final assistant message."""
    messages = record["messages"]
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("task_reference: the record's last message must be the assistant's answer")
    return str(messages[-1]["content"])


def _canonical_json(text: str) -> str | None:
    try:
        return json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False)
    except ValueError:
        return None


def exact_match(prediction: str, reference: str) -> bool:
    """True when both sides parse as JSON and are the same value, or neither does and the stripped
    strings are equal.

    The JSON comparison is of canonical dumps (sorted keys, fixed spacing), so key order and
    whitespace do not matter but value *types* do: ``34`` ≠ ``"34"`` and ``34`` ≠ ``34.0``. Text
    around the JSON (a code fence, "Here is the JSON:") makes the prediction not parse, hence a miss.
    """
    p, r = _canonical_json(prediction.strip()), _canonical_json(reference.strip())
    if p is not None and r is not None:
        return p == r
    return prediction.strip() == reference.strip()


def score_exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of :func:`exact_match` hits, in [0, 1]."""
    if len(predictions) != len(references):
        raise ValueError(
            f"score_exact_match: {len(predictions)} predictions for {len(references)} references"
        )
    if not references:
        raise ValueError("score_exact_match: no references to score")
    return sum(exact_match(p, r) for p, r in zip(predictions, references)) / len(references)
