"""QLoRA: LoRA over a Linear4bit base equals LoRA over the dequantized weights (outputs and gradients),
trains through the loop, and merging into 4 bits requantizes."""

from __future__ import annotations

import copy

import torch
from torch import nn

import deltatune
from deltatune.methods.lora import LoraLayer
from deltatune.quant.linear4bit import Linear4bit, quantize_model

IDS = torch.randint(4, 200, (2, 11), generator=torch.Generator().manual_seed(0))


def _dequantized_copy(qmodel: nn.Module) -> nn.Module:
    """The same model with every Linear4bit replaced by an nn.Linear holding its dequantized weight."""
    model = copy.deepcopy(qmodel)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Linear4bit):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.dequantized_weight(torch.float32)
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)
    return model


def test_qlora_equals_lora_on_dequantized_weights(llama_factory) -> None:
    qmodel = quantize_model(llama_factory(), compute_dtype=torch.float32)
    ref = _dequantized_copy(qmodel)
    cfg = deltatune.LoraConfig(r=4, alpha=8, target_modules="all-linear")
    for m in (qmodel, ref):
        torch.manual_seed(3)
        deltatune.inject(m, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (_, lq), (_, lr) in zip(deltatune.lora_layers(qmodel), deltatune.lora_layers(ref)):
            b = torch.randn(lq.factors("default")[1].shape, generator=g) * 0.05
            lq.factors("default")[1].copy_(b)
            lr.factors("default")[1].copy_(b)
            lr.factors("default")[0].copy_(lq.factors("default")[0])
    assert isinstance(qmodel.get_submodule("model.layers.0.self_attn.q_proj").base_layer, Linear4bit)
    out_q = qmodel(IDS, labels=IDS)
    out_r = ref(IDS, labels=IDS)
    torch.testing.assert_close(out_q.logits, out_r.logits, rtol=1e-4, atol=1e-4)
    out_q.loss.backward()
    out_r.loss.backward()
    grads_q = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    grads_r = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_r.keys() and grads_q
    for n in grads_q:
        torch.testing.assert_close(grads_q[n], grads_r[n], rtol=1e-3, atol=1e-5)
    # only adapter parameters get gradients; the packed base gets none
    assert all(p.grad is None for n, p in qmodel.named_parameters() if ".lora_" not in n)


def test_merge_into_4bit_requantizes_and_stays_close(llama_factory) -> None:
    qmodel = quantize_model(llama_factory(), compute_dtype=torch.float32)
    deltatune.inject(qmodel, deltatune.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for _, layer in deltatune.lora_layers(qmodel):
            layer.factors("default")[1].normal_(std=0.05)
    unmerged = qmodel(IDS).logits
    layer = qmodel.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoraLayer)
    before = layer.base_layer.weight.detach().clone()
    deltatune.merge(qmodel)
    assert not torch.equal(layer.base_layer.weight, before)  # new packed codes
    merged = qmodel(IDS).logits
    # requantization adds NF4 rounding error on the merged weights: close, not equal
    err = (merged - unmerged).abs().max().item()
    assert 0 < err < 0.5


def test_qlora_trains_through_the_registry(llama_factory) -> None:
    from deltatune.registry import apply_method
    from deltatune.train.config import TrainConfig
    from deltatune.train.hooks import RunInfo

    model = llama_factory()
    cfg = TrainConfig(method="qlora")
    apply_method(model, cfg, RunInfo(total_steps=1, steps_per_epoch=1))  # qlora = lora + model.quantize=nf4
    q = model.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(q, LoraLayer) and isinstance(q.base_layer, Linear4bit)
    assert q.base_layer.compute_dtype == torch.float32
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_dequantize_on_the_thread_pool_inside_inference_mode() -> None:
    """The chunked CPU path runs on worker threads; inference mode must follow the caller there."""
    from deltatune.quant.nf4 import dequantize_4bit, quantize_4bit

    w = torch.randn(512, 1024)
    packed, state = quantize_4bit(w, 64, True, "nf4")
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the pool is used only with several torch threads
    try:
        with torch.inference_mode():
            inside = dequantize_4bit(packed, state, torch.float32)
        outside = dequantize_4bit(packed, state, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(inside, outside)
