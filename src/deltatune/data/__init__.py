"""Training data: read user files, normalise record shapes, tokenise with the chat template, mask
prompts, pack, collate, and a deterministic resumable batch order.

Files: JSONL, JSON (a list, or ``{"data": [...]}``), CSV, Parquet. Record shapes:

==========  ====================================================================
text        ``{"text": ...}``                      loss on every token
alpaca      ``{"instruction", "input"?, "output", "system"?}``  → user/assistant turns
chat        ``{"messages": [{"role", "content"}, ...]}``  roles system/user/assistant
sharegpt    ``{"conversations": [{"from", "value"}, ...]}``  human→user, gpt→assistant
==========  ====================================================================

A malformed record is a :class:`DataError` naming ``file:line`` (JSONL, CSV) or
``file (record i)`` (JSON, Parquet; 0-based) and what is wrong — or, with
``skip_bad_records``, it is skipped and counted.

Loss masking (``completion_only_loss``): the conversation is rendered with the tokenizer's own
chat template; for each assistant turn *i* the answer's character span is
``[len(render(messages[:i], add_generation_prompt=True)), len(render(messages[:i+1])))`` — the
template decides where the answer starts, we never guess. Tokens whose first character falls in
a span are trained on (every assistant turn of a multi-turn chat is); all others get -100.
Templates that re-render earlier turns differently once later turns exist (e.g. dropping past
"thinking") cannot be masked this way and raise a clear error instead of masking wrongly.
"""

from __future__ import annotations

from .batching import IGNORE_INDEX, collate, count_loss_tokens, epoch_batches, epoch_order
from .prepare import PreparedData, data_report, prepare_data, reference_batches
from .records import (
    FORMATS,
    DataError,
    Example,
    LoadedExamples,
    Message,
    Tokenized,
    detect_format,
    examples_from_records,
    load_examples,
    read_records,
)
from .tokenize import pack_examples, prompt_and_reference, tokenize_example, tokenize_examples

__all__ = [
    "DataError",
    "Example",
    "FORMATS",
    "IGNORE_INDEX",
    "LoadedExamples",
    "Message",
    "PreparedData",
    "Tokenized",
    "collate",
    "count_loss_tokens",
    "data_report",
    "detect_format",
    "epoch_batches",
    "epoch_order",
    "examples_from_records",
    "load_examples",
    "pack_examples",
    "prepare_data",
    "prompt_and_reference",
    "read_records",
    "reference_batches",
    "tokenize_example",
    "tokenize_examples",
]
