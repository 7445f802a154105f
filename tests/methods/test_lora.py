"""LoRA layer and injection: a live naive-formula reference and the invariants (MISSION §2)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

import deltatune
from deltatune import LoraConfig
from deltatune.methods.lora import LoraLayer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def randomize_b(model: nn.Module, std: float = 0.05) -> None:
    """Force B ≠ 0 so every adapter changes the output (invariants must be able to fail)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(model):
            for name in layer.adapters:
                _, b = layer.factors(name)
                b.copy_(torch.randn(b.shape, generator=g) * std)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- formula, per kind
@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_naive_formula(rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    layer = LoraLayer(base)
    layer.add("a", r=4, alpha=8, rslora=rslora, init="gaussian")
    layer.active = ["a"]
    a, b = layer.factors("a")
    with torch.no_grad():
        b.normal_()
    x = torch.randn(3, 5, 32)
    s = 8 / math.sqrt(4) if rslora else 8 / 4
    want = x @ base.weight.T + base.bias + s * (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_gaussian_init_sigma_and_b_zero() -> None:
    layer = LoraLayer(nn.Linear(4096, 8))
    layer.add("a", r=64, alpha=64, init="gaussian")
    a, b = layer.factors("a")
    assert torch.count_nonzero(b) == 0
    assert abs(a.std().item() - 1 / math.sqrt(4096)) < 0.02 / math.sqrt(4096)


def test_kaiming_init_matches_nn_linear_bound() -> None:
    layer = LoraLayer(nn.Linear(256, 8))
    layer.add("a", r=16, alpha=16, init="kaiming")
    a, _ = layer.factors("a")
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) on fan_in k gives U(-1/√k, 1/√k)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound


def test_conv1d_matches_naive_formula() -> None:
    torch.manual_seed(0)
    base = Conv1D(24, 32)  # nf=24 outputs, nx=32 inputs; W (32, 24)
    layer = LoraLayer(base)
    layer.add("a", r=4, alpha=4)
    layer.active = ["a"]
    a, b = layer.factors("a")
    with torch.no_grad():
        b.normal_()
    x = torch.randn(2, 7, 32)
    want = x @ base.weight + base.bias + (x @ a.T) @ b.T
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_embedding_matches_naive_formula() -> None:
    torch.manual_seed(0)
    base = nn.Embedding(50, 16, padding_idx=0)
    layer = LoraLayer(base)
    layer.add("a", r=4, alpha=8)
    layer.active = ["a"]
    a, b = layer.factors("a")  # (r, V), (d, r)
    with torch.no_grad():
        b.normal_()
    ids = torch.randint(0, 50, (3, 9))
    onehot = torch.nn.functional.one_hot(ids, 50).float()
    want = base.weight[ids] + 2.0 * (onehot @ a.T) @ b.T
    torch.testing.assert_close(layer(ids), want, rtol=1e-5, atol=1e-5)


def test_conv2d_matches_naive_formula_and_merge() -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(6, 8, 3, padding=1)
    layer = LoraLayer(base)
    layer.add("a", r=2, alpha=4)
    layer.active = ["a"]
    a, b = layer.factors("a")
    with torch.no_grad():
        b.normal_()
    x = torch.randn(2, 6, 10, 10)
    want = base(x) + 2.0 * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, a, padding=1), b)
    out = layer(x)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    layer.merge()
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


def test_dropout_acts_on_adapter_input_only() -> None:
    from deltatune.methods.lora import _keep_mask, effective_dropout

    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    layer = LoraLayer(base)
    layer.add("a", r=4, alpha=4, dropout=0.5)
    layer.active = ["a"]
    layer.train()
    x = torch.randn(64, 16, requires_grad=True)
    # With B = 0 the dropped adapter path adds nothing: the output is exactly the base output.
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)
    a, b = layer.factors("a")
    with torch.no_grad():
        b.normal_()
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    keep = _keep_mask(x.shape, 0.5, x.device)
    xd = x * keep / (1 - effective_dropout(0.5))  # naive dropout with the same mask
    want = base(x) + (xd @ a.T) @ b.T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # gradients through the custom autograd function equal autograd through the naive formula
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, a], g)
    ref = torch.autograd.grad(want, [x, a], g)
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_dropout_mask_rate() -> None:
    from deltatune.methods.lora import _keep_mask

    torch.manual_seed(0)
    n = 1_000_000
    dropped = 1 - _keep_mask(torch.Size([n]), 0.05, torch.device("cpu")).float().mean().item()
    # binomial std for p=0.05, n=1e6 is 2.2e-4; 5 sigma
    assert abs(dropped - 0.05) < 5 * (0.05 * 0.95 / n) ** 0.5


# ----------------------------------------------------------------------------- invariants on models
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_b_zero_gives_base_output(make) -> None:
    model = make()
    want = model(IDS).logits
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merged_equals_unmerged_equals_unloaded(make) -> None:
    model = make()
    base_logits = model(IDS).logits
    deltatune.inject(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_b(model)
    unmerged = model(IDS).logits
    assert (unmerged - base_logits).abs().max() > 1e-3, "adapter must change the output"
    deltatune.merge(model)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    deltatune.unmerge(model)
    torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
    plain = deltatune.unload(model)
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    torch.testing.assert_close(plain(IDS).logits, unmerged, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_base_weights() -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_b(model)
    deltatune.merge(model)
    deltatune.unmerge(model)
    plain = deltatune.unload(model, merge_adapters=False)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


def test_disabled_equals_base_even_when_merged() -> None:
    model = tiny_llama()
    want = model(IDS).logits
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_b(model)
    with deltatune.disable_adapters(model):
        torch.testing.assert_close(model(IDS).logits, want, rtol=0, atol=0)
    deltatune.merge(model)
    merged = model(IDS).logits
    with deltatune.disable_adapters(model):
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(IDS).logits, merged, rtol=1e-5, atol=1e-5)


def test_only_adapter_params_get_grads_and_base_unchanged_after_step() -> None:
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomize_b(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    opt.step()
    sd = deltatune.unload(model, merge_adapters=False).state_dict()
    for k, v in sd.items():
        assert torch.equal(v, base[k]), k


def test_targets_suffix_regex_layers_exclude_and_patterns() -> None:
    model = tiny_llama()
    found = deltatune.find_targets(model, LoraConfig(target_modules=["q_proj", "mlp.down_proj"]))
    assert found == [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "mlp.down_proj")]
    found = deltatune.find_targets(model, LoraConfig(target_modules=r".*\.(k|v)_proj"))
    assert len(found) == 4 and all(f.endswith(("k_proj", "v_proj")) for f in found)
    found = deltatune.find_targets(model, LoraConfig(target_modules="all-linear", exclude_modules=["o_proj"],
                                                     layers_to_transform=[1]))
    assert "lm_head" not in found and all(".1." in f and "o_proj" not in f for f in found)
    assert len(found) == 6
    deltatune.inject(model, LoraConfig(r=4, alpha=4, target_modules=["q_proj", "v_proj"],
                                       rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 16}))
    q1 = model.get_submodule("model.layers.1.self_attn.q_proj")
    v0 = model.get_submodule("model.layers.0.self_attn.v_proj")
    assert isinstance(q1, LoraLayer) and q1.adapters["default"].r == 2
    assert isinstance(v0, LoraLayer) and v0.adapters["default"].scale == 16 / 4


def test_no_match_lists_existing_names() -> None:
    with pytest.raises(ValueError, match=r"Adaptable module names are: .*'q_proj'.*Did you mean \['q_proj'"):
        deltatune.inject(tiny_llama(), LoraConfig(target_modules=["qproj"]))


def test_multiple_adapters_switch_delete_and_per_sample() -> None:
    model = tiny_llama()
    base = model(IDS).logits
    deltatune.inject(model, LoraConfig(r=4, target_modules="all-linear"), name="one")
    deltatune.inject(model, LoraConfig(r=2, target_modules=["q_proj"]), name="two")
    randomize_b(model)
    deltatune.set_active(model, "one")
    out_one = model(IDS).logits
    deltatune.set_active(model, "two")
    out_two = model(IDS).logits
    assert (out_one - out_two).abs().max() > 1e-3
    # trainable = exactly the active adapter's parameters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".two." in n for n in trainable)
    with deltatune.adapter_per_sample(model, ["one", None]):
        mixed = model(IDS).logits
    torch.testing.assert_close(mixed[0], out_one[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-5, atol=1e-5)
    deltatune.delete_adapter(model, "two")
    assert not any(".two." in n for n, _ in model.named_parameters())
    deltatune.set_active(model, "one")
    torch.testing.assert_close(model(IDS).logits, out_one, rtol=1e-5, atol=1e-5)


def test_per_sample_training_routes_gradients() -> None:
    model = tiny_llama()
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), name="one")
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), name="two")
    randomize_b(model)
    for p in model.parameters():
        p.requires_grad_(".lora_" in "")  # reset
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    with deltatune.adapter_per_sample(model, ["one", "one"]):
        model(IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}
    assert all(g is not None for n, g in grads.items() if ".one." in n)
    assert all(g is None for n, g in grads.items() if ".two." in n)


def test_modules_to_save_and_bias_modes() -> None:
    model = tiny_gpt2()
    deltatune.inject(model, LoraConfig(r=4, target_modules=["c_attn"], modules_to_save=["ln_f"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "transformer.ln_f.modules_to_save.default.weight" in trainable
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.mlp.c_fc.bias" not in trainable


def test_parameter_report_counts() -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    deltatune.inject(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    rep = deltatune.parameter_report(model)
    # q_proj: 64→64, v_proj: 64→32 (2 kv heads × 16): r(d+k) each, 2 layers
    want = 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert rep["trainable"] == want
    assert rep["total"] == total + want
    assert rep["line"] == f"trainable params: {want:,d} || all params: {total + want:,d} || trainable%: {100 * want / (total + want):.4f}"
    assert sum(rep["per_module"].values()) == want


def test_injected_layers_follow_model_eval_mode() -> None:
    model = tiny_llama()  # eval mode
    deltatune.inject(model, LoraConfig(r=4, dropout=0.5, target_modules="all-linear"))
    randomize_b(model)
    torch.testing.assert_close(model(IDS).logits, model(IDS).logits, rtol=0, atol=0)
