"""Tokenising with the chat template and prompt masking; packing; prompts and references for generation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from deltatune.losses import IGNORE_INDEX

from .records import DataError, Example, Message, Tokenized

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["tokenize_example", "tokenize_examples", "pack_examples", "prompt_and_reference"]

# ---------------------------------------------------------------------------------------------
# Tokenising with prompt masking


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], gen_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, ex: Example, full: str
) -> list[tuple[int, int]]:
    assert ex.messages is not None
    spans = []
    for i, m in enumerate(ex.messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, ex.messages[:i], gen_prompt=True)
        through = _render(tokenizer, ex.messages[: i + 1], gen_prompt=False)
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise DataError(
                f"{ex.source}: cannot locate assistant turn {i} for loss masking: the tokenizer's chat template "
                "renders earlier turns differently once later turns are added. Set data.completion_only_loss=false "
                "to train on all tokens, or use a template that renders conversations prefix-consistently"
            )
        spans.append((len(before), len(through)))
    return spans


def _token_mask(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], source: str
) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether its first character lies in a span."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return ids, [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    except NotImplementedError:  # slow (Python) tokenizers have no offsets: compare prefix lengths
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        mask = [False] * len(ids)
        for s, e in spans:
            lo, hi = (len(tokenizer(text[:c], add_special_tokens=False)["input_ids"]) for c in (s, e))
            if ids[:hi] != list(tokenizer(text[:e], add_special_tokens=False)["input_ids"]):
                raise DataError(
                    f"{source}: the tokenizer merges tokens across the prompt/answer boundary, so the answer "
                    "cannot be masked exactly; set data.completion_only_loss=false"
                ) from None
            mask[lo:hi] = [True] * (hi - lo)
        return ids, mask


def tokenize_example(
    ex: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, completion_only_loss: bool = True
) -> Tokenized:
    """``input_ids`` and ``labels`` (same length ≤ max_length; -100 where no loss is taken).

    Text: the tokenizer's own special tokens plus eos, loss everywhere. Chat: the chat template
    (which already contains the special tokens), loss on assistant turns only when
    ``completion_only_loss``."""
    if ex.text is not None:
        ids = list(tokenizer(ex.text, add_special_tokens=True)["input_ids"])
        eos = tokenizer.eos_token_id
        if isinstance(eos, int) and (not ids or ids[-1] != eos):
            ids.append(eos)  # the model must learn where a document ends
        labels = list(ids)
    else:
        assert ex.messages is not None
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{ex.source}: the tokenizer has no chat template, so chat/alpaca data cannot be rendered; "
                "use a chat model or data.format=text"
            )
        full = _render(tokenizer, ex.messages, gen_prompt=False)
        if completion_only_loss:
            ids, mask = _token_mask(tokenizer, full, _assistant_char_spans(tokenizer, ex, full), ex.source)
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        else:
            ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
            labels = list(ids)
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    completion_only_loss: bool = True,
    dropped_sources: list[str] | None = None,
) -> tuple[list[Tokenized], int, int]:
    """Tokenise all; returns ``(rows, truncated, dropped)``: ``truncated`` counts kept rows that were
    cut to max_length; ``dropped`` counts examples left with no loss token (a prompt longer than
    max_length, say), which are removed rather than trained on as pure padding. Their locations
    (``file:line``) are appended to ``dropped_sources`` when given, for the run's data report."""
    rows: list[Tokenized] = []
    truncated = dropped = 0
    for ex in examples:
        row = tokenize_example(ex, tokenizer, max_length + 1, completion_only_loss)
        was_cut = len(row["input_ids"]) > max_length
        row = {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}
        # labels[0] never counts: position 0 has no previous token to predict it from.
        if all(t == IGNORE_INDEX for t in row["labels"][1:]):
            dropped += 1
            if dropped_sources is not None:
                dropped_sources.append(ex.source)
            continue
        truncated += was_cut
        rows.append(row)
    return rows, truncated, dropped


def pack_examples(rows: Sequence[Tokenized], max_length: int) -> list[Tokenized]:
    """Greedy, order-preserving packing: append whole examples to a row while they fit in
    ``max_length`` tokens, else start a new row. Labels keep their masking.

    Caveat: with ordinary (SDPA/eager) attention, tokens attend across example boundaries inside a
    row; the examples are independent, so this is mild noise that packing trades for fewer pad
    tokens. Exact isolation needs per-example position_ids with a varlen (flash) kernel."""
    packed: list[Tokenized] = []
    ids: list[int] = []
    labels: list[int] = []
    for row in rows:
        if len(row["input_ids"]) > max_length:
            raise ValueError(
                f"pack_examples: a row of {len(row['input_ids'])} tokens exceeds max_length={max_length}"
            )
        if ids and len(ids) + len(row["input_ids"]) > max_length:
            packed.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids.extend(row["input_ids"])
        labels.extend(row["labels"])
    if ids:
        packed.append({"input_ids": ids, "labels": labels})
    return packed


def prompt_and_reference(ex: Example) -> tuple[list[Message], str] | None:
    """For generation-based eval: the messages before the last assistant turn, and that turn's
    text. ``None`` for plain-text examples (nothing to generate against)."""
    if ex.messages is None:
        return None
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return [dict(m) for m in ex.messages[:last]], ex.messages[last]["content"]
