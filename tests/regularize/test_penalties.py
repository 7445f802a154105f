"""EWC / L2-SP / KL penalties and the Fisher estimate against naive formulas written here (fp64)."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune.regularize.config import EwcConfig, KlConfig, L2spConfig
from deltatune.regularize.ewc import EwcHook, fisher_diagonal, load_fisher, save_fisher
from deltatune.regularize.kl import KlHook
from deltatune.regularize.l2sp import L2spHook
from deltatune.regularize.sites import sites
from deltatune.testing import build_tiny_tokenizer, make_tiny_gpt2, make_tiny_llama
from deltatune.train.data import collate
from deltatune.train.forgetting import adapter_measure
from deltatune.train.reference import text_rows

TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris.",
         "Maria Lopez, a 34-year-old nurse from Lisbon.", "Translate to German: good morning."]


@pytest.fixture
def tok():
    return build_tiny_tokenizer()


def _rows(tok):
    return text_rows(TEXTS, tok, 10_000, 24)


def _loss(model, b):  # the causal-LM objective's per-token mean loss, written out
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    labels = b["labels"][:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum") / (labels != -100).sum()


def _force_b(model, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for n in layer.adapters:
                b = layer.factors(n)[1]
                b.copy_(torch.randn(b.shape, generator=g, dtype=b.dtype) * std)


def _rand_fisher(site_list, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.rand(s.param.shape, generator=g, dtype=torch.float64) for s in site_list}


def test_ewc_full_penalty_and_gradient_match_naive_fp64(tok):
    model = make_tiny_llama(vocab_size=len(tok)).double()
    model.requires_grad_(True)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    site_list = sites(model)
    fisher = _rand_fisher(site_list)
    hook = EwcHook(EwcConfig(weight=3.0), site_list, fisher)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    named = dict(model.named_parameters())
    naive = sum(0.5 * 3.0 * (fisher[n] * (named[n] - start[n]) ** 2).sum() for n in fisher)
    got = hook.extra_loss(model)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(naive), rel=1e-9)
    for n, p in named.items():
        torch.testing.assert_close(p.grad.double(), 3.0 * fisher[n] * (p.detach() - start[n]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("factory", [make_tiny_llama, make_tiny_gpt2])  # nn.Linear and GPT-2 Conv1D layouts
def test_ewc_lora_penalty_on_effective_delta_matches_naive_fp64(tok, factory):
    model = factory(vocab_size=len(tok)).double()
    deltatune.inject(model, deltatune.LoraConfig(r=3, alpha=6, target_modules="all-linear"))
    _force_b(model)
    site_list = sites(model)
    layers = dict(deltatune.lora_layers(model))
    assert len(site_list) == len(layers)  # one site per adapted layer, none for the factors
    fisher = _rand_fisher(site_list)
    hook = EwcHook(EwcConfig(weight=2.0), site_list, fisher)
    got = hook.extra_loss(model)
    got.backward()
    factors = [t for layer in layers.values() for t in layer.factors("default")]
    grads = [t.grad.clone() for t in factors]
    for t in factors:
        t.grad = None
    naive = 0.0
    for path, layer in layers.items():
        a, b = layer.factors("default")
        dw = layer.adapters["default"].scale * torch.einsum("dr,rk->dk", b, a)  # (d, k)
        if layer.kind == "conv1d":
            dw = dw.T  # Conv1D stores W as (k, d)
        naive = naive + 0.5 * 2.0 * (fisher[f"{path}.base_layer.weight"] * dw ** 2).sum()
    naive.backward()
    assert float(got) == pytest.approx(float(naive), rel=1e-9)
    for g, t in zip(grads, factors):
        torch.testing.assert_close(g, t.grad, rtol=1e-9, atol=1e-12)


def test_l2sp_lora_is_norm_of_delta_and_zero_at_start(tok):
    model = make_tiny_llama(vocab_size=len(tok)).double()
    deltatune.inject(model, deltatune.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    hook = L2spHook(L2spConfig(weight=0.5), sites(model))
    assert float(hook.extra_loss(model)) == 0.0  # B = 0
    _force_b(model)
    naive = sum(0.25 * ((layer.adapters["default"].scale * layer.factors("default")[1] @ layer.factors("default")[0])
                        ** 2).sum() for _, layer in deltatune.lora_layers(model))
    assert float(hook.extra_loss(model)) == pytest.approx(float(naive), rel=1e-9)


def _per_sample_fisher(model, params, batches, labels_for=None):
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for b in batches:
        if labels_for is not None:
            b = labels_for(b)
        model.zero_grad(set_to_none=True)
        _loss(model, b).backward()
        for a, p in zip(acc, params):
            a += p.grad.double() ** 2
    return [a / len(batches) for a in acc]


def test_fisher_empirical_matches_per_sample_loop(tok):
    model = make_tiny_llama(vocab_size=len(tok)).double().eval()
    model.requires_grad_(True)
    site_list = sites(model)
    batches = [collate([r], tok.pad_token_id) for r in _rows(tok)]
    got = fisher_diagonal(model, site_list, batches, _loss)
    ref = _per_sample_fisher(model, [s.param for s in site_list], batches)
    for s, r in zip(site_list, ref):
        torch.testing.assert_close(got[s.name].double(), r, rtol=1e-5, atol=1e-12)


def test_fisher_for_lora_is_the_base_weights_fisher(tok):
    """With B = 0 the LoRA sites' Fisher is the base model's Fisher w.r.t. its own weights."""
    model = make_tiny_llama(vocab_size=len(tok)).double().eval()
    base = copy.deepcopy(model)
    deltatune.inject(model, deltatune.LoraConfig(r=2, target_modules="all-linear"))
    site_list = sites(model)
    batches = [collate([r], tok.pad_token_id) for r in _rows(tok)]
    got = fisher_diagonal(model, site_list, batches, _loss)
    named = dict(base.named_parameters())
    params = [named[s.name.replace(".base_layer", "")] for s in site_list]
    for p in params:
        p.requires_grad_(True)
    ref = _per_sample_fisher(base, params, batches)
    for s, r in zip(site_list, ref):
        torch.testing.assert_close(got[s.name].double(), r, rtol=1e-5, atol=1e-12)
    assert not any(s.param.requires_grad for s in site_list)  # W₀ frozen again


def test_fisher_sampled_matches_per_sample_loop_with_same_draws(tok):
    model = make_tiny_llama(vocab_size=len(tok)).double().eval()
    model.requires_grad_(True)
    site_list = sites(model)[:5]
    batches = [collate([r], tok.pad_token_id) for r in _rows(tok)]
    got = fisher_diagonal(model, site_list, batches, _loss, estimator="sampled", seed=7)
    gen = torch.Generator().manual_seed(7)

    def draw(b):
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"]).logits[0, :-1]  # (T-1, V), one row, no padding
        y = torch.multinomial(logits.float().softmax(-1), 1, generator=gen).squeeze(-1)
        labels = b["labels"].clone()
        labels[0, 1:] = y
        return {**b, "labels": labels}

    ref = _per_sample_fisher(model, [s.param for s in site_list], batches, draw)
    for s, r in zip(site_list, ref):
        torch.testing.assert_close(got[s.name].double(), r, rtol=1e-5, atol=1e-12)
    emp = fisher_diagonal(model, site_list, batches, _loss)
    assert not torch.allclose(emp[site_list[0].name], got[site_list[0].name])


def test_fisher_file_round_trip_and_mismatch(tok, tmp_path):
    model = make_tiny_llama(vocab_size=len(tok))
    deltatune.inject(model, deltatune.LoraConfig(r=2, target_modules=["q_proj"]))
    site_list = sites(model)
    fisher = {k: v.float() for k, v in _rand_fisher(site_list).items()}
    save_fisher(tmp_path / "f.safetensors", fisher, {}, {"estimator": "empirical"})
    f2, stars = load_fisher(tmp_path / "f.safetensors")
    assert stars == {} and all(torch.equal(f2[k], fisher[k]) for k in fisher)
    other = make_tiny_llama(vocab_size=len(tok))
    deltatune.inject(other, deltatune.LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="no Fisher for"):
        EwcHook.create(EwcConfig(weight=1.0, fisher_file=str(tmp_path / "f.safetensors")), sites(other),
                       lambda: [], _loss, other)


def test_unsupported_methods_are_refused(tok):
    model = make_tiny_llama(vocab_size=len(tok))
    deltatune.inject(model, deltatune.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        sites(model, "regularize.ewc")


def test_kl_hook_matches_forgetting_kl_and_cycles(tok):
    rows = _rows(tok)
    model = make_tiny_llama(vocab_size=len(tok))
    deltatune.inject(model, deltatune.LoraConfig(r=2, target_modules="all-linear"))
    hook = KlHook(KlConfig(weight=1.0, batch_size=len(rows)), rows, tok.pad_token_id, adapters=True)
    model.eval()
    assert float(hook.extra_loss(model)) == 0.0  # B = 0
    _force_b(model)
    ref = adapter_measure(model, rows, tok.pad_token_id, batch_size=len(rows))["kl_mean"]
    model.eval()
    got = hook.extra_loss(model)
    assert float(got) == pytest.approx(ref, rel=1e-5)
    got.backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for _, layer in deltatune.lora_layers(model)
               for t in layer.factors("default"))
    small = KlHook(KlConfig(weight=1.0, batch_size=3), rows, tok.pad_token_id, adapters=True)
    small.extra_loss(model)
    small.extra_loss(model)
    assert small.state_dict() == {"cursor": (6 % len(rows))}


def test_kl_hook_full_uses_cache(tok):
    rows = _rows(tok)
    model = make_tiny_llama(vocab_size=len(tok)).eval()
    hook = KlHook(KlConfig(weight=1.0, batch_size=2), rows, tok.pad_token_id, adapters=False, model=model,
                  top_k=len(tok))
    assert float(hook.extra_loss(model)) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert float(hook.extra_loss(model)) > 1e-4
