"""Test helpers that need no network: a tiny byte-level BPE tokenizer with a ChatML chat template.

The Hub is unreachable in tests and CI, so tests (and the CLI end-to-end test) build this tokenizer
in memory in a few milliseconds. It behaves like SmolLM2's where it matters for the data pipeline:
byte-level BPE (any Unicode text round-trips, merges make multi-character tokens so prompt/answer
boundaries are not trivially per-character), ``<|im_start|>``/``<|im_end|>`` special tokens, and the
same ChatML template (with a default system turn when none is given). Unlike SmolLM2 it has a
*distinct* pad token, so a test catches code that confuses padding with end-of-turn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

__all__ = ["CHATML_TEMPLATE", "TINY_SPECIAL_TOKENS", "TINY_VOCAB", "TinyCase", "build_tiny_tokenizer", "save_tiny_backbone", "make_tiny_gpt2",
           "make_tiny_llama"]

# SmolLM2-135M-Instruct's template, with a shorter default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ids 0..3, in this order
TINY_SPECIAL_TOKENS: tuple[str, ...] = ("<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")

_CORPUS = """\
system user assistant You are a helpful assistant.
Extract the person's details from the text as JSON. {"name": "Maria Lopez", "age": 34, "city": "Lisbon", "job": "nurse"}
Maria Lopez, a 34-year-old nurse from Lisbon, volunteers at the local library.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
What is the capital of France? The capital of France is Paris. Translate to German: good morning.
The quick brown fox jumps over the lazy dog. 0123456789 () [] {} : ; , . ! ? ' " - _ / \\ + = * & % $ # @
"""


def build_tiny_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences, with a ChatML template.

    pad = ``<|pad|>`` (id 0), eos = ``<|im_end|>`` (as in SmolLM2's chat models), no bos. It can be
    ``save_pretrained``-ed and loaded back with ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


TINY_VOCAB = 256  # enough for a byte-level tokenizer; tests with a real tokenizer pass len(tokenizer)


def make_tiny_llama(vocab_size: int = TINY_VOCAB, *, seed: int = 0, **overrides: Any) -> LlamaForCausalLM:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads (GQA), MLP 128."""
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Token ids 0/1/2 play pad/bos/eos, as in SmolLM2; a tiny tokenizer can map them to its specials.
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model.float().eval()


def make_tiny_gpt2(vocab_size: int = TINY_VOCAB, *, seed: int = 0, **overrides: Any) -> GPT2LMHeadModel:
    """GPT2LMHeadModel: n_embd 64, 2 layers, 4 heads; its attention/MLP use the transformers Conv1D."""
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**kwargs))
    return model.float().eval()


def bnb_fp32_reference(model: torch.nn.Module) -> torch.nn.Module:
    """Make a transformers + bitsandbytes 4-bit model compute as its config says (in place).

    bitsandbytes >= 0.48 on a CPU with AVX512-BF16 routes no-grad inference of ``Linear4bit``
    through a fused kernel that casts the input *and the absmax* to bf16, whatever
    ``bnb_4bit_compute_dtype`` is: its logits then differ from an fp32 reference by ~1e-3.
    Turning that off gives bitsandbytes' own dequantize + fp32 matmul, which is what the storage
    format defines and what our tests compare with (on other CPUs nothing changes).
    """
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            setattr(m, "support_avx512bf16_for_cpu", False)  # noqa: B010 (attribute is not typed)
    return model


@dataclass
class TinyCase:
    """What tests/test_matrix.py needs to train an objective for 2 steps on a tiny model
    (``Objective.tiny_case()`` returns one; every objective in ``registry.OBJECTIVES`` must).

    ``make_model()`` returns a fresh, identically initialised model each call (fp32, CPU);
    ``overrides`` are ``--set`` items giving tiny data and cheap evaluation; ``outputs(model)`` is what
    a save → load round trip must reproduce (e.g. the logits on a fixed batch); ``load_saved(dir)``
    loads a full-model save (``<run>/model``) back."""

    make_model: Callable[[], nn.Module]
    processor: Any
    overrides: list[str]
    outputs: Callable[[nn.Module], torch.Tensor]
    load_saved: Callable[[Path], nn.Module]
    notes: dict[str, Any] = field(default_factory=dict)


def save_tiny_backbone(kind: str, d: Path, max_positions: int = 128) -> Path:
    """A tiny random ``bert`` encoder or ``llama`` decoder with the tiny tokenizer, saved as an HF
    directory (a classification backbone for tests). Seeded: the same call gives the same weights."""
    from transformers import BertConfig, BertModel, LlamaConfig

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    if kind == "bert":
        BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=max_positions,
                             pad_token_id=tok.pad_token_id)).save_pretrained(d)
    else:
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return d
