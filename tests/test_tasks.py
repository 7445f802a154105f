"""The built-in task (deltatune.tasks): determinism, no train/eval overlap, format, exact-match scoring."""

from __future__ import annotations

import json

import pytest

from deltatune.tasks import (
    FIELDS,
    SYSTEM_PROMPT,
    exact_match,
    make_task,
    score_exact_match,
    task_prompt,
    task_reference,
)


def _names(records: list[dict]) -> set[str]:
    return {json.loads(task_reference(r))["name"] for r in records}


def test_default_sizes_and_chat_shape() -> None:
    train, ev = make_task()
    assert (len(train), len(ev)) == (320, 40)
    for rec in train + ev:
        roles = [m["role"] for m in rec["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert rec["messages"][0]["content"] == SYSTEM_PROMPT


def test_deterministic_per_seed_and_seed_matters() -> None:
    assert make_task(50, 10, seed=3) == make_task(50, 10, seed=3)
    assert make_task(50, 10, seed=3) != make_task(50, 10, seed=4)


def test_no_overlap_between_train_and_eval() -> None:
    train, ev = make_task()
    assert not _names(train) & _names(ev)
    assert len(_names(train)) == len(train)  # every person unique, within a split too
    sentences = [r["messages"][1]["content"] for r in train]
    assert not set(sentences) & {r["messages"][1]["content"] for r in ev}


def test_answer_has_fixed_format_and_matches_the_sentence() -> None:
    train, _ = make_task(200, 0, seed=1)
    for rec in train:
        answer = task_reference(rec)
        data = json.loads(answer)
        assert tuple(data) == FIELDS
        assert isinstance(data["age"], int) and 19 <= data["age"] <= 78
        assert answer == json.dumps(data)  # json.dumps spacing, key order as listed
        sentence = rec["messages"][1]["content"]
        for key in ("name", "city", "job"):
            assert data[key] in sentence
        assert str(data["age"]) in sentence


def test_sentences_vary_in_template_and_field_order() -> None:
    train, _ = make_task()
    openings = {r["messages"][1]["content"].split()[0] for r in train}
    assert len(openings) > 20  # names, cities, ages and fixed words all appear first
    # Name is not always the first field mentioned.
    firsts = [r["messages"][1]["content"].startswith(json.loads(task_reference(r))["name"]) for r in train]
    assert 0.1 < sum(firsts) / len(firsts) < 0.6


def test_prompt_drops_only_the_answer() -> None:
    rec = make_task(1, 0)[0][0]
    assert task_prompt(rec) == rec["messages"][:2]
    with pytest.raises(ValueError, match="last message must be the assistant"):
        task_prompt({"messages": rec["messages"][:2]})


def test_too_many_examples_is_an_error() -> None:
    with pytest.raises(ValueError, match="at most"):
        make_task(1500, 200)


def test_exact_match_rules() -> None:
    ref = '{"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}'
    assert exact_match(ref, ref)
    assert exact_match(
        '  {"age":34,"name":"Maria Lopez","job":"nurse","city":"Lisbon"}\n', ref
    )  # order/spacing
    assert not exact_match(
        '{"name": "Maria Lopez", "age": "34", "city": "Lisbon", "job": "nurse"}', ref
    )  # type
    assert not exact_match('{"name": "Maria Lopez", "age": 34.0, "city": "Lisbon", "job": "nurse"}', ref)
    assert not exact_match('{"name": "Maria Lopez", "age": 34, "city": "Lisbon"}', ref)  # missing key
    assert not exact_match("```json\n" + ref + "\n```", ref)  # extra text → does not parse → string compare
    assert exact_match(" Paris ", "Paris") and not exact_match("paris", "Paris")


def test_score_exact_match() -> None:
    refs = ['{"a": 1}', "x", "y", "z"]
    assert score_exact_match(['{ "a" : 1 }', "x", "no", "z "], refs) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="predictions"):
        score_exact_match(["x"], refs)
    with pytest.raises(ValueError, match="no references"):
        score_exact_match([], [])
