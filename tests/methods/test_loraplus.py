"""LoRA+: B's learning rate is ratio × A's (MISSION §6), groups as PEFT builds them."""

from __future__ import annotations

import copy

import pytest
import torch

import deltatune
from deltatune import LoraConfig
from deltatune.methods.loraplus import loraplus_param_groups
from deltatune.testing import make_tiny_llama

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def lora_model(**cfg: object) -> torch.nn.Module:
    model = make_tiny_llama(attention_bias=True)  # q/k/v/o biases, for bias='lora_only'
    deltatune.inject(model, LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj", "embed_tokens"], **cfg}))
    return model


def lr_by_name(model: torch.nn.Module, groups: list[dict]) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_groups_lr_and_membership() -> None:
    model = lora_model(use_dora=True, bias="lora_only")
    groups = loraplus_param_groups(model, lr=1e-4, ratio=16, weight_decay=0.1, embedding_lr=3e-5)
    got = lr_by_name(model, groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(got) == trainable and sum(len(g["params"]) for g in groups) == len(trainable)
    for name, (lr, wd) in got.items():
        if "embed_tokens" in name and "lora_embedding" in name:
            assert (lr, wd) == (3e-5, 0.1), name
        elif "lora_B" in name or "lora_magnitude_vector" in name:
            assert (lr, wd) == (pytest.approx(1.6e-3), 0.1), name  # B and DoRA's m: the larger rate
        elif name.endswith("bias"):
            assert (lr, wd) == (pytest.approx(1.6e-3), 0.0), name
        else:
            assert "lora_A" in name and (lr, wd) == (1e-4, 0.1), name
    assert {g["name"] for g in groups} == {"A", "embedding", "B", "B_no_decay"}
    # embedding_lr=None: embedding adapters train at lr
    assert {v for n, v in lr_by_name(model, loraplus_param_groups(model, lr=1e-4)).items()
            if "lora_embedding" in n} == {(1e-4, 0.0)}


def test_sgd_step_moves_b_ratio_times() -> None:
    """Naive check: with plain SGD, one LoRA+ step moves B by ratio × (and A by 1 ×) the plain step."""
    ratio = 16.0
    model = lora_model(target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)  # B ≠ 0 so that A gets a gradient
    twin = copy.deepcopy(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for m, opt in ((model, torch.optim.SGD(loraplus_param_groups(model, lr=0.1, ratio=ratio))),
                   (twin, torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.1))):
        m(IDS).logits.square().mean().backward()
        opt.step()
    plain = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        if n in start:
            k = ratio if "lora_B" in n else 1.0
            step, plain_step = p.detach() - start[n], plain[n].detach() - start[n]
            assert plain_step.abs().max() > 0, n
            torch.testing.assert_close(step, k * plain_step, rtol=1e-4, atol=1e-6 * k)


def test_groups_match_peft_create_loraplus_optimizer() -> None:
    peft = pytest.importorskip("peft")
    optimizers = pytest.importorskip("peft.optimizers")
    base = make_tiny_llama()
    targets = ["q_proj", "v_proj", "embed_tokens"]
    ours = copy.deepcopy(base)
    deltatune.inject(ours, LoraConfig(r=4, target_modules=targets, use_dora=True))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=targets, use_dora=True))
    opt = optimizers.create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=2e-4, loraplus_lr_ratio=8,
                                               loraplus_lr_embedding=1e-6, loraplus_weight_decay=0.01)
    want = {k.removeprefix("base_model.model."): v for k, v in lr_by_name(theirs, opt.param_groups).items()}
    got = lr_by_name(ours, loraplus_param_groups(ours, lr=2e-4, ratio=8, weight_decay=0.01, embedding_lr=1e-6))
    assert got.keys() == want.keys() and len(got) > 0
    for k in got:
        assert got[k] == pytest.approx(want[k]), k


def test_train_config_loraplus_ratio_builds_groups() -> None:
    from deltatune.train.config import LoopConfig, TrainConfig
    from deltatune.train.optim import make_optimizer

    model = lora_model(target_modules=["q_proj"])
    cfg = TrainConfig(train=LoopConfig(lr=1e-3, loraplus_ratio=4.0))
    lrs = {n: v[0] for n, v in lr_by_name(model, make_optimizer(cfg, model).param_groups).items()}
    assert lrs and all(lr == pytest.approx(4e-3 if "lora_B" in n else 1e-3) for n, lr in lrs.items())
    off = make_optimizer(TrainConfig(train=LoopConfig(lr=1e-3)), model)
    assert {g["lr"] for g in off.param_groups} == {1e-3}
    with pytest.raises(ValueError, match="loraplus_ratio"):
        LoopConfig(loraplus_ratio=-1.0)
