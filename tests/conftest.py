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
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads
    # spin-waiting on each other made the tiny-model tests ~10x slower (5 s -> 47 s measured).
    # DELTATUNE_TEST_THREADS overrides (e.g. for `-m slow` runs on the real model).
    torch.set_num_threads(int(os.environ.get("DELTATUNE_TEST_THREADS", "1")))


from deltatune.testing import TINY_VOCAB, make_tiny_gpt2, make_tiny_llama  # noqa: E402,F401

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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny Llama + the tiny tokenizer saved as an HF model directory (for CLI/loop tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.testing import build_tiny_tokenizer

    d = tmp_path_factory.mktemp("tiny-model")
    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d
