"""The top-level API (set_active, disable_adapters, merge, unload, delete_adapter) works for every method."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.methods.bottleneck import BottleneckConfig
from deltatune.methods.bottleneck import inject as inject_bottleneck
from deltatune.methods.prompts import PromptConfig
from deltatune.methods.prompts import inject as inject_prompt
from deltatune.methods.vera import VeraConfig, inject_vera

IDS = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))


def _perturb(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kind", ["bottleneck", "prompt", "vera"])
def test_disable_is_base_and_merge_rules(kind: str, llama_factory) -> None:
    model = llama_factory()
    base = model(IDS).logits
    if kind == "bottleneck":
        inject_bottleneck(model, BottleneckConfig(r=4))
    elif kind == "prompt":
        inject_prompt(model, PromptConfig(kind="prompt", num_virtual_tokens=3, init="random"))
    else:
        inject_vera(model, VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _perturb(model)
    adapted = model(IDS).logits
    assert (adapted - base).abs().max() > 1e-4
    with deltatune.disable_adapters(model):
        torch.testing.assert_close(model(IDS).logits, base, rtol=1e-6, atol=1e-6)
    deltatune.set_active(model, "default")
    if kind == "vera":
        deltatune.merge(model)
        torch.testing.assert_close(model(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
        plain = deltatune.unload(model)
        torch.testing.assert_close(plain(IDS).logits, adapted, rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="cannot merge"):
            deltatune.merge(model)
        deltatune.delete_adapter(model, "default")
        torch.testing.assert_close(model(IDS).logits, base, rtol=1e-6, atol=1e-6)
