"""Shared fixtures: tiny transformers models built from configs (random weights, no downloads).

The ``make_*`` functions are plain so a test can build several models (different vocab sizes,
seeds); the fixtures are the common case. All models are fp32, seeded, in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
    # spin-waiting on each other made the tiny-model tests ~10x slower (5 s -> 47 s measured).
    # DELTATUNE_TEST_THREADS overrides (e.g. for `-m slow` runs on the real model).
    torch.set_num_threads(int(os.environ.get("DELTATUNE_TEST_THREADS", "1")))


TINY_VOCAB = 256  # enough for a byte-level tokenizer; tests with a real tokenizer pass len(tokenizer)


def make_tiny_llama(vocab_size: int = TINY_VOCAB, *, seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """LlamaForCausalLM: hidden 64, 2 layers, 4 heads (head_dim 16), 2 kv heads (GQA), MLP 128."""
    kwargs: dict[str, object] = dict(
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


def make_tiny_gpt2(vocab_size: int = TINY_VOCAB, *, seed: int = 0, **overrides: object) -> GPT2LMHeadModel:
    """GPT2LMHeadModel: n_embd 64, 2 layers, 4 heads; its attention/MLP use the transformers Conv1D."""
    kwargs: dict[str, object] = dict(
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


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (no merges): ids 0/1/2 = <pad>/<|im_start|>/<|im_end|> (eos), then the
    256 byte symbols; ChatML chat template like SmolLM2's. 259 tokens, built offline in ~ms.

    Stand-in until ``deltatune.testing.build_tiny_tokenizer`` is shared by all tests.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


@pytest.fixture
def llama_factory() -> Callable[..., LlamaForCausalLM]:
    """``make_tiny_llama`` for tests that build several models (avoids importing conftest by name)."""
    return make_tiny_llama


@pytest.fixture
def gpt2_factory() -> Callable[..., GPT2LMHeadModel]:
    return make_tiny_gpt2


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()
