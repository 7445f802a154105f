"""deltatune.generate against references written here: each request decoded alone through the
model's own single-adapter LoRA path (set_active), a naive sampler with no cache, and plain
string search for stop sequences."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.generate import (
    DecodeBatch,
    Row,
    SamplingParams,
    TextTracker,
    encode_prompt,
    generate_ids,
    generate_texts,
)
from deltatune.methods.lora_batched import AdapterBank
from deltatune.testing import build_tiny_tokenizer, make_tiny_gpt2, make_tiny_llama

PROMPTS = ["hi", "the quick brown fox jumps over", "a", "What is the capital of France?", "xyz xyz", "ok"]


def _nonzero(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for n in layer.adapters:
                for t in layer.factors(n):
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def _with_adapters(arch: str = "llama", vocab: int = 400):
    """A tiny model with three LoRA adapters of different shapes: rank 4, rank 8 with rsLoRA on
    more modules, and one with a per-module rank; all forced non-zero."""
    model = (make_tiny_llama if arch == "llama" else make_tiny_gpt2)(vocab_size=vocab)
    if arch == "llama":
        cfgs = {
            "a": deltatune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
            "b": deltatune.LoraConfig(r=8, alpha=4, use_rslora=True, target_modules="all-linear"),
            "c": deltatune.LoraConfig(r=2, alpha=2, target_modules=["o_proj", "embed_tokens"],
                                      rank_pattern={"o_proj": 6}),
        }
    else:
        cfgs = {
            "a": deltatune.LoraConfig(r=4, alpha=8, target_modules=["c_attn"]),
            "b": deltatune.LoraConfig(r=8, alpha=4, use_rslora=True, target_modules=["c_attn", "c_fc", "c_proj"]),
            "c": deltatune.LoraConfig(r=2, alpha=2, target_modules=["c_proj", "wte"]),
        }
    for name, cfg in cfgs.items():
        deltatune.inject(model, cfg, name=name)
    _nonzero(model, 0)
    return model.eval()


def _alone(model, prompt: list[int], adapter: str | None, max_new: int, stop: set[int]) -> list[int]:
    """The reference: one row, the model's own LoRA forward with only that adapter active."""
    if adapter is None:
        with deltatune.disable_adapters(model):
            return generate_ids(model, [Row(prompt, SamplingParams(max_new))], stop_ids=stop, pad_id=0)[0].tokens
    deltatune.set_active(model, adapter)
    return generate_ids(model, [Row(prompt, SamplingParams(max_new))], stop_ids=stop, pad_id=0)[0].tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bank_logits_equal_each_adapter_alone(arch):
    model = _with_adapters(arch)
    ids = torch.randint(4, 400, (5, 7), generator=torch.Generator().manual_seed(1))
    names = ["a", None, "b", "c", "a"]
    refs = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n is None:
                with deltatune.disable_adapters(model):
                    refs.append(model(ids[i : i + 1]).logits)
            else:
                deltatune.set_active(model, n)
                refs.append(model(ids[i : i + 1]).logits)
        base = None
        with deltatune.disable_adapters(model):
            base = model(ids).logits
        bank = AdapterBank(model)
        with bank.route(names):
            mixed = model(ids).logits
        with bank.route(["b"] * 5):  # the uniform (no-gather) path
            uniform = model(ids).logits
        deltatune.set_active(model, "b")
        bank.close()
        only_b = model(ids).logits
    torch.testing.assert_close(mixed, torch.cat(refs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(uniform, only_b, rtol=1e-4, atol=1e-5)
    for i in range(5):  # every adapter really changes its rows (the test could fail)
        if names[i] is not None:
            assert (mixed[i] - base[i]).abs().max() > 1e-2


@pytest.mark.parametrize("masked_max", [0, 10_000])
def test_bank_both_mixed_paths_and_resident_reuse(monkeypatch, masked_max):
    """A mixed batch takes the masked GEMMs over the resident adapters (few tokens per row) or the
    per-row gathered bmm (many); both equal each adapter alone, also when the batch's adapters
    change: a subset keeps the resident blocks (checked), a new set rebuilds them."""
    from deltatune.methods import lora_batched

    monkeypatch.setattr(lora_batched, "_MASKED_MAX", masked_max)
    model = _with_adapters()
    ids = torch.randint(4, 400, (4, 6), generator=torch.Generator().manual_seed(3))
    ref = {}
    with torch.no_grad():
        for n in (None, "a", "b", "c"):
            if n is None:
                with deltatune.disable_adapters(model):
                    out = model(ids).logits
            else:
                deltatune.set_active(model, n)
                out = model(ids).logits
            for i in range(4):
                ref[(i, n)] = out[i]
        bank = AdapterBank(model)
        keys = []
        for names in (["a", "a", None, None], ["b", "c", "a", None], ["b", None, "b", "b"], ["c", "a", "c", "b"]):
            with bank.route(names):
                got = model(ids).logits
            keys.append(bank._key)
            torch.testing.assert_close(got, torch.stack([ref[(i, n)] for i, n in enumerate(names)]),
                                       rtol=1e-4, atol=1e-5)
    a, b, c = (bank.slots[n] for n in "abc")
    assert keys == [(a,), (a, b, c), (a, b, c), (a, b, c)]  # rebuilt once, then kept for subsets


def test_mixed_adapter_batch_greedy_equals_each_alone():
    tok = build_tiny_tokenizer()
    model = _with_adapters()
    stop = {tok.eos_token_id}
    encoded = [encode_prompt(tok, p) for p in PROMPTS]
    names = ["a", "b", None, "c", "b", "a"]
    expected = [_alone(model, e, n, 10, stop) for e, n in zip(encoded, names)]
    assert len({tuple(e) for e in expected}) > 3
    bank = AdapterBank(model)
    rows = [Row(e, SamplingParams(10), n) for e, n in zip(encoded, names)]
    got = [r.tokens for r in generate_ids(model, rows, stop_ids=stop, pad_id=0, bank=bank)]
    assert got == expected
    # generate_texts with per-row adapters: same replies, in the input order
    texts = generate_texts(model, tok, PROMPTS, max_new_tokens=10, progress=False, adapters=names, bank=bank, batch_size=4)
    assert texts == [tok.decode(e, skip_special_tokens=True).strip() for e in expected]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_joining_and_leaving_equal_each_alone(arch):
    """Continuous batching: rows join a running batch (shorter and longer than the cache) and
    leave when done; every row's greedy tokens equal the row decoded alone."""
    tok = build_tiny_tokenizer()
    model = _with_adapters(arch)
    stop = {tok.eos_token_id}
    encoded = [encode_prompt(tok, p) for p in PROMPTS]
    names = ["b", None, "a", "c", "a", "b"]
    lengths = [12, 3, 9, 14, 5, 8]
    expected = [_alone(model, e, n, m, stop) for e, n, m in zip(encoded, names, lengths)]
    bank = AdapterBank(model)
    batch = DecodeBatch(model, stop_ids=stop, pad_id=0, bank=bank)
    rows = [Row(e, SamplingParams(m), n) for e, n, m in zip(encoded, names, lengths)]
    batch.add(rows[:2])
    steps = 0
    joined = 2
    widths = []
    while batch.active or joined < len(rows):
        if steps in (2, 4, 5) and joined < len(rows):
            take = 2 if steps == 2 else 1
            batch.add(rows[joined : joined + take])
            joined += take
        batch.step()
        batch.compact()
        widths.append(batch._mask.shape[1] if batch._mask is not None else 0)
        steps += 1
        if steps > 6 and joined < len(rows):
            batch.add(rows[joined:])
            joined = len(rows)
    assert [r.tokens for r in rows] == expected
    assert any(b < a for a, b in zip(widths, widths[1:]))  # padding columns were cut after a long row left
    assert all(r.finish_reason in ("stop", "length") for r in rows)


def test_seeded_sampling_is_batch_independent_and_matches_naive_sampler():
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    with torch.no_grad():  # sharper logits so top-p really cuts
        model.lm_head.weight.mul_(20)
    stop = {tok.eos_token_id}
    p = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, top_k=50, seed=123)
    prompt = encode_prompt(tok, "the quick brown fox")

    # naive: full forward each step, explicit filtering, same per-request generator
    g = torch.Generator().manual_seed(123)
    seq, naive = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            z = model(torch.tensor([seq])).logits[0, -1].float() / 0.7
            kth = torch.topk(z, 50).values[-1]
            z[z < kth] = float("-inf")
            probs = torch.softmax(z, -1)
            order = probs.argsort(descending=True)
            keep, mass = [], 0.0
            for t in order.tolist():
                keep.append(t)
                mass += float(probs[t])
                if mass >= 0.9:
                    break
            filt = torch.zeros_like(probs)
            filt[keep] = probs[keep]
            t = int(torch.multinomial(filt, 1, generator=g))
            if t in stop:
                break
            naive.append(t)
            seq.append(t)
    alone = generate_ids(model, [Row(prompt, p)], stop_ids=stop, pad_id=0)[0].tokens
    others = [Row(encode_prompt(tok, q), SamplingParams(8, temperature=1.0, seed=i)) for i, q in enumerate(PROMPTS)]
    mixed = generate_ids(model, [others[0], Row(prompt, p), *others[1:]], stop_ids=stop, pad_id=0)[1].tokens
    assert alone == naive == mixed
    other_seed = generate_ids(model, [Row(prompt, SamplingParams(8, temperature=0.7, top_p=0.9, seed=7))],
                              stop_ids=stop, pad_id=0)[0].tokens
    assert other_seed != alone


def test_stop_strings_cut_the_text_and_stream_deltas_concatenate():
    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok))
    prompt = encode_prompt(tok, "hello there")
    free = generate_ids(model, [Row(prompt, SamplingParams(20))], stop_ids=set(), pad_id=0)[0].tokens
    full = tok.decode(free, skip_special_tokens=True)
    assert len(full) > 6
    stop = full[4:6]  # a stop string the free text contains
    expected = full[: full.find(stop)]
    tracker = TextTracker(tok, [stop, "\x00never"])
    row = Row(prompt, SamplingParams(20, stop=(stop,)), text=tracker)
    batch = DecodeBatch(model, stop_ids=set(), pad_id=0)
    batch.add([row])
    deltas = [tracker.take_delta()]
    while batch.active:
        batch.step()
        deltas.append(tracker.take_delta())
    assert row.finish_reason == "stop"
    assert tracker.text == expected == "".join(deltas)
    assert len(row.tokens) < len(free)


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_bank_refuses_dora_and_merged_adapters():
    model = make_tiny_llama()
    deltatune.inject(model, deltatune.LoraConfig(r=2, use_dora=True), name="d")
    with pytest.raises(ValueError, match="DoRA"):
        AdapterBank(model)
    model = make_tiny_llama()
    deltatune.inject(model, deltatune.LoraConfig(r=2), name="m")
    deltatune.merge(model)
    with pytest.raises(ValueError, match="merged"):
        AdapterBank(model)


def test_bank_on_a_bf16_base_matches_each_adapter_alone():
    model = _with_adapters().to(torch.bfloat16)
    ids = torch.randint(4, 400, (4, 6), generator=torch.Generator().manual_seed(2))
    names = ["b", "a", None, "c"]
    refs = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n is None:
                with deltatune.disable_adapters(model):
                    refs.append(model(ids[i : i + 1]).logits.float())
            else:
                deltatune.set_active(model, n)
                refs.append(model(ids[i : i + 1]).logits.float())
        bank = AdapterBank(model)
        with bank.route(names):
            mixed = model(ids).logits
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), torch.cat(refs), rtol=0.05, atol=0.05)
