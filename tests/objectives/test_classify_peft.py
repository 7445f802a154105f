"""Classifier files against live peers: a SEQ_CLS adapter of every method loads in PEFT
(``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base, num_labels=K), dir)``)
and back in deltatune with the same logits; full/partial/head runs' HF directories load in
``AutoModelForSequenceClassification`` with the same logits. Tiny BERT and tiny Llama backbones."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
)

from deltatune.classifier import (
    classifier_head,
    load_classifier,
    load_classifier_adapter,
    save_classifier,
    train_head,
)
from deltatune.data.labelled import LabelMap
from deltatune.testing import save_tiny_backbone

LABELS = LabelMap(("negative", "neutral", "positive"))


def _save_base(kind: str, d: Path) -> Path:
    return save_tiny_backbone(kind, d, max_positions=64)


@pytest.fixture(scope="module", params=["bert", "llama"])
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, _save_base(request.param, tmp_path_factory.mktemp(f"base-{request.param}"))


def _batch(tok: Any, padded: bool = True) -> dict[str, torch.Tensor]:
    texts = ["The quick brown fox.", "Maria Lopez is a nurse from Lisbon, she volunteers.", "What is it?"]
    enc = tok(texts, padding=True, return_tensors="pt")
    if not padded:  # two rows of one length: a sentence and its tokens reversed
        ids = torch.tensor(tok(texts[1])["input_ids"])
        return {"input_ids": torch.stack([ids, ids.flip(0)]), "attention_mask": torch.ones(2, len(ids), dtype=torch.long)}
    assert not bool(enc["attention_mask"].all())  # the padded batch has padding
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _perturb(model: nn.Module) -> None:
    """Every trainable tensor off its init (LoRA's B, VeRA's λ_b, AdaLoRA's Λ start at 0), so the
    adapter and the head really change the logits."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


def _lora(m: nn.Module) -> None:
    from deltatune.inject import inject
    from deltatune.methods.lora_config import LoraConfig

    inject(m, LoraConfig(r=4, alpha=8, target_modules="all-linear"))


def _dora(m: nn.Module) -> None:
    from deltatune.inject import inject
    from deltatune.methods.lora_config import LoraConfig

    inject(m, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))


def _vera(m: nn.Module) -> None:
    from deltatune.methods.vera import VeraConfig, inject_vera

    inject_vera(m, VeraConfig(r=8, target_modules="all-linear", projection_prng_key=5))


def _adalora(m: nn.Module) -> None:
    from deltatune.methods.adalora import AdaLoraConfig, inject_adalora

    inject_adalora(m, AdaLoraConfig(init_r=4, target_r=2, target_modules="all-linear"), total_step=10)


def _prompt(kind: str, projection: bool) -> Callable[[nn.Module], None]:
    def apply(m: nn.Module) -> None:
        from deltatune.methods import prompts

        prompts.inject(m, prompts.PromptConfig(kind=kind, num_virtual_tokens=3, projection=projection, init="random"))

    return apply


PEFT_METHODS: dict[str, Callable[[nn.Module], None]] = {
    "lora": _lora, "dora": _dora, "vera": _vera, "adalora": _adalora,
    "prompt_tuning": _prompt("prompt", False), "prefix_tuning": _prompt("prefix", True),
}


def _trained(base_dir: Path, apply: Callable[[nn.Module], None]) -> tuple[nn.Module, Any]:
    torch.manual_seed(1)
    model, tok = load_classifier(str(base_dir), LABELS, dtype="fp32", device="cpu")
    apply(model)
    train_head(model)
    _perturb(model)
    return model.eval(), tok


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_seq_cls_adapter_loads_in_peft_and_back(base: tuple[str, Path], method: str, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    kind, base_dir = base
    if kind == "bert" and method.startswith("prefix"):
        pytest.skip("transformers' BERT takes no past_key_values: no prefix tuning on it")
    model, tok = _trained(base_dir, PEFT_METHODS[method])
    # PEFT's prompt tuning pools the last *position* of a decoder (it passes inputs_embeds, so the model
    # cannot find the last non-pad token); deltatune pools the last real token. Equal without padding.
    batch = _batch(tok, padded=not (kind == "llama" and method == "prompt_tuning"))
    with torch.no_grad():
        ours = model(**batch).logits
    adapter = save_classifier(model, tok, tmp_path)
    assert adapter.name == "adapter"

    # PEFT 0.21 refuses prefix tuning on LlamaForSequenceClassification ("does not support past key
    # values"): there only deltatune's own round trip below is checked.
    if not method.startswith("prefix"):
        torch.manual_seed(123)  # a different random head in the base: the file's head must replace it
        pm = peft.PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS),
                                                               pad_token_id=tok.pad_token_id), adapter).eval()
        with torch.no_grad():
            theirs = pm(**batch).logits
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)

    torch.manual_seed(77)
    again, _ = load_classifier(str(base_dir), LABELS, dtype="fp32", device="cpu")
    with torch.no_grad():
        assert not torch.allclose(again(**batch).logits, ours, atol=1e-3)  # a fresh head differs…
    load_classifier_adapter(again, adapter)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch).logits, ours, rtol=1e-5, atol=1e-6)  # …until loaded


def test_bottleneck_classifier_round_trip(base: tuple[str, Path], tmp_path: Path) -> None:
    """PEFT has no bottleneck adapters: deltatune's own file, with the head beside it, round-trips."""
    from deltatune.methods import bottleneck

    kind, base_dir = base
    model, tok = _trained(base_dir, lambda m: bottleneck.inject(m, bottleneck.BottleneckConfig(r=4)))
    batch = _batch(tok)
    with torch.no_grad():
        ours = model(**batch).logits
    adapter = save_classifier(model, tok, tmp_path)
    torch.manual_seed(9)
    again, _ = load_classifier(str(base_dir), LABELS, dtype="fp32", device="cpu")
    load_classifier_adapter(again, adapter)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**batch).logits, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", ["head", "partial", "full"])
def test_model_directory_loads_in_transformers(base: tuple[str, Path], strategy: str, tmp_path: Path) -> None:
    kind, base_dir = base
    torch.manual_seed(1)
    model, tok = load_classifier(str(base_dir), LABELS, dtype="fp32", device="cpu")
    model.requires_grad_(strategy == "full")
    if strategy == "partial":
        from deltatune.structure import block_list

        block_list(model)[1][-1].requires_grad_(True)
    head = train_head(model)
    assert head is classifier_head(model)[1] and all(p.requires_grad for p in head.parameters())
    _perturb(model)
    batch = _batch(tok)
    with torch.no_grad():
        ours = model.eval()(**batch).logits
    target = save_classifier(model, tok, tmp_path)
    assert target.name == "model"
    hf = AutoModelForSequenceClassification.from_pretrained(target).eval()
    assert hf.config.id2label == LABELS.id2label
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, ours, rtol=1e-5, atol=1e-6)
