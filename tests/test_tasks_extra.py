"""The extra built-in tasks: deterministic, disjoint splits, answers that follow from the text."""

from __future__ import annotations

import datetime
import re

import pytest

from deltatune.tasks_extra import TASKS, make_date_task, make_sentiment_task


@pytest.mark.parametrize("name", sorted(TASKS))
def test_deterministic_and_disjoint(name: str) -> None:
    make = TASKS[name]
    tr, ev = make(100, 30, 0)
    assert (tr, ev) == make(100, 30, 0)
    assert len(tr) == 100 and len(ev) == 30
    assert make(100, 30, 1) != (tr, ev)
    users = [r["messages"][1]["content"] for r in tr]
    assert not {r["messages"][1]["content"] for r in ev} & set(users)


def test_sentiment_balanced_and_labels() -> None:
    tr, ev = make_sentiment_task(200, 40)
    labels = [r["messages"][-1]["content"] for r in tr + ev]
    assert set(labels) == {"positive", "negative"} and abs(labels.count("positive") - 120) <= 1
    for r in tr:
        text, label = r["messages"][1]["content"], r["messages"][-1]["content"]
        if "Five stars" in text:
            assert label == "positive"
        if "One star" in text:
            assert label == "negative"


def test_dates_answer_is_the_date_in_the_text() -> None:
    tr, ev = make_date_task(200, 40)
    for r in tr + ev:
        iso = r["messages"][-1]["content"]
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", iso)
        d = datetime.date.fromisoformat(iso)
        assert str(d.year) in r["messages"][1]["content"] and str(d.day) in r["messages"][1]["content"]
