"""Bottleneck adapters: the naive formula on whole blocks (pre-LN GPT-2, post-LN BERT), the invariants,
named adapters, the file format, and a training run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel

import deltatune
from deltatune import AdapterFileError, AdapterMismatchError
from deltatune.methods import bottleneck as bn
from deltatune.methods.bottleneck import ACTIVATIONS, BottleneckConfig, BottleneckLayer
from deltatune.testing import make_tiny_gpt2, make_tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def make_tiny_bert(hidden: int = 32) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


MODELS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2, "bert": make_tiny_bert}


def nonzero(model: torch.nn.Module) -> None:
    """W_up, b_up (and b_down) ≠ 0 so every adapter changes the output (invariants must be able to fail)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in bn.bottleneck_layers(model):
            for name in layer.down:
                for p in (layer.up[name].weight, layer.up[name].bias, layer.down[name].bias):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def hidden(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)[0]  # logits (LM heads) or last hidden state (BertModel)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_layer_matches_naive_formula(activation: str) -> None:
    torch.manual_seed(0)
    layer = BottleneckLayer(16)
    layer.add("a", 4, activation, "kaiming")
    layer.active = ["a"]
    down, up = layer.down["a"], layer.up["a"]
    with torch.no_grad():
        up.weight.normal_()
        up.bias.normal_()
    h = torch.randn(3, 5, 16)
    f = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    want = h + f(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-5)
    # A second active adapter at the same site adds its own term on the same input h.
    layer.add("b", 2, "relu", "houlsby")
    with torch.no_grad():
        layer.up["b"].weight.normal_()
    layer.active = ["a", "b"]
    d2, u2 = layer.down["b"], layer.up["b"]
    want = want + torch.relu(h @ d2.weight.T + d2.bias) @ u2.weight.T + u2.bias
    torch.testing.assert_close(layer(h), want, rtol=1e-5, atol=1e-5)


def test_gpt2_block_matches_naive_houlsby() -> None:
    """Pre-LN block: h = x + a + A₁(a), a = attn(ln₁(x)); out = h + m + A₂(m), m = mlp(ln₂(h))."""
    model = make_tiny_gpt2()
    bn.inject(model, BottleneckConfig(r=4, activation="gelu"))
    nonzero(model)
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 64)
    a1 = lambda t: block.bottleneck_attn.delta(t, "default")  # noqa: E731
    a2 = lambda t: block.bottleneck_ffn.delta(t, "default")  # noqa: E731
    with torch.no_grad():
        got = block(x)
        with bn.disable(model):
            a = block.attn(block.ln_1(x))[0]
            h = x + a + a1(a)
            m = block.mlp(block.ln_2(h))
            want = h + m + a2(m)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bert_layer_matches_naive_houlsby_before_layernorm() -> None:
    """Post-LN block: the adapter acts on the projected sublayer output before the residual and LayerNorm:
    h = LN₁(a + A₁(a) + x), a = dense(self_attn(x)); out = LN₂(m + A₂(m) + h), m = dense(intermediate(h))."""
    model = make_tiny_bert()
    bn.inject(model, BottleneckConfig(r=4))
    nonzero(model)
    layer = model.encoder.layer[1]
    att, out = layer.attention.output, layer.output
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = layer(x)
        with bn.disable(model):
            a = att.dense(layer.attention.self(x)[0])
            h = att.LayerNorm(a + layer.bottleneck_attn.delta(a, "default") + x)
            m = out.dense(layer.intermediate(h))
            want = out.LayerNorm(m + layer.bottleneck_ffn.delta(m, "default") + h)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_init_is_base_disabled_is_base_and_parameter_count(family: str, placement: str) -> None:
    make = MODELS[family]
    model = make()
    base = hidden(make())
    bn.inject(model, BottleneckConfig(r=4, placement=placement))
    assert torch.equal(hidden(model), base)  # W_up = 0, b_up = 0
    nonzero(model)
    assert (hidden(model) - base).abs().max() > 1e-3
    with bn.disable(model):
        assert torch.equal(hidden(model), base)
    d, r = model.config.hidden_size, 4
    sites = 2 * (2 if placement == "houlsby" else 1)  # 2 blocks
    assert deltatune.parameter_report(model)["trainable"] == sites * (2 * d * r + r + d)
    assert sorted({p.rsplit(".", 1)[1] for p, _ in bn.bottleneck_layers(model)}) == (
        ["bottleneck_attn", "bottleneck_ffn"] if placement == "houlsby" else ["bottleneck_ffn"])


def test_named_adapters_add_switch_delete() -> None:
    model = make_tiny_llama()
    base = hidden(model)
    keys = set(model.state_dict())
    bn.inject(model, BottleneckConfig(r=4), name="a")
    bn.inject(model, BottleneckConfig(r=2, placement="pfeiffer", activation="silu"), name="b")
    nonzero(model)
    bn.set_active(model, ["a", "b"])
    both = hidden(model)
    bn.set_active(model, "a")
    only_a = hidden(model)
    assert (both - only_a).abs().max() > 1e-4
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".a." in n}
    bn.set_active(model, "b")
    only_b = hidden(model)
    assert (both - only_b).abs().max() > 1e-4
    bn.delete(model, "a")
    torch.testing.assert_close(hidden(model), only_b, rtol=0, atol=0)
    bn.delete(model, "b")
    assert torch.equal(hidden(model), base) and set(model.state_dict()) == keys
    assert not list(bn.bottleneck_layers(model))


def test_deepcopy_keeps_hooks_on_the_copy() -> None:
    model = make_tiny_gpt2()
    bn.inject(model, BottleneckConfig(r=4))
    nonzero(model)
    want = hidden(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in bn.bottleneck_layers(twin):
            layer.up["default"].weight.normal_()  # (a constant shift of b_up would vanish in GPT-2's LayerNorms)
    assert torch.equal(hidden(model), want) and (hidden(twin) - want).abs().max() > 1e-2


def test_train_step_moves_only_the_adapter() -> None:
    model = make_tiny_llama()
    bn.inject(model, BottleneckConfig(r=4))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("family", sorted(MODELS))
def test_save_load_round_trip(family: str, tmp_path: Path) -> None:
    make = MODELS[family]
    model = make()
    bn.inject(model, BottleneckConfig(r=4, activation="gelu", layers_to_transform=[1]))
    nonzero(model)
    want = hidden(model)
    d = deltatune.save_adapter(model, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "DELTATUNE_BOTTLENECK" and cfg["format_version"] == 1 and cfg["r"] == 4
    loaded = deltatune.load_adapter(make(), d)
    torch.testing.assert_close(hidden(loaded), want, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in loaded.parameters())
    again = deltatune.load_adapter(make(), d, name="x", trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, _ in again.named_parameters() if ".x." in n} != set()


def test_wrong_base_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    model = make_tiny_bert()
    bn.inject(model, BottleneckConfig(r=4))
    d = deltatune.save_adapter(model, tmp_path / "a")
    other = make_tiny_bert(hidden=64)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AdapterMismatchError, match=r"bottleneck_attn\.down\.weight has shape \[4, 32\] .* \[4, 64\]"):
        deltatune.load_adapter(other, d)
    assert set(other.state_dict()) == set(before) and not list(bn.bottleneck_layers(other))
    with pytest.raises(AdapterMismatchError, match="no counterpart"):
        deltatune.load_adapter(make_tiny_llama(), d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(AdapterFileError, match="format_version=99"):
        deltatune.load_adapter(make_tiny_bert(), d)


def test_train_loop_method_bottleneck(tmp_path: Path) -> None:
    from deltatune.config import load_config
    from deltatune.testing import build_tiny_tokenizer
    from deltatune.train.config import TrainConfig
    from deltatune.train.loop import run

    tok = build_tiny_tokenizer()
    model = make_tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    sets = ["data.num_train=8", "data.num_eval=2", "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2",
            f"output_dir={tmp_path / 'run'}", "eval.exact_match=false", "train.bf16=false", "method=bottleneck",
            "bottleneck.r=4", "bottleneck.placement=pfeiffer"]
    res = run(load_config(TrainConfig, None, sets), model=model, tokenizer=tok, progress=False)
    assert res.losses[1] < res.losses[0] and res.summary["trainable_params"] == 2 * (2 * 64 * 4 + 4 + 64)
    fresh = make_tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    loaded = deltatune.load_adapter(fresh, tmp_path / "run" / "adapter")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)


def test_cached_generation_equals_recomputation() -> None:
    model = make_tiny_llama()
    bn.inject(model, BottleneckConfig(r=4))
    nonzero(model)
    prompt = IDS[:1]
    got = model.generate(input_ids=prompt, max_new_tokens=5, do_sample=False)
    want = prompt
    with torch.no_grad():
        for _ in range(5):
            want = torch.cat([want, model(want).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, want)
    assert not torch.equal(got, make_tiny_llama().generate(input_ids=prompt, max_new_tokens=5, do_sample=False))
