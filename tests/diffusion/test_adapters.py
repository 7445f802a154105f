"""LoRA on the UNet (and text encoder) in diffusers' file layout, with diffusers itself as the oracle:
``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(out)`` computes what deltatune does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune import lora_layers
from deltatune.diffusion import (
    LORA_WEIGHTS_NAME,
    apply_lora,
    freeze_for_full,
    load_diffusers_lora,
    load_pipeline,
    lora_target_regex,
    save_diffusers_lora,
)
from deltatune.methods.lora_config import LoraConfig


def _force_nonzero(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in layer.adapters:
                _, b = layer.factors(name)
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)


def _unet_inputs(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    c = model.unet.config
    noisy = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([10, 700])
    ids = model.tokenize(["a photo of a sks bag", "a photo of a bag"])
    return noisy, t, ids


def test_targets_are_attention_projections(tiny_model) -> None:
    apply_lora(tiny_model, LoraConfig(r=2, alpha=4, target_modules=lora_target_regex(text_encoder_modules=None)))
    names = [n for n, _ in lora_layers(tiny_model)]
    assert names and all(n.startswith("unet.") for n in names)
    assert {n.split(".")[-1] if not n.endswith("to_out.0") else "to_out.0" for n in names} == {"to_q", "to_k", "to_v", "to_out.0"}
    trainable = [n for n, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in tiny_model.vae.parameters())
    assert not any("vae" in k for k in tiny_model.state_dict())


@pytest.mark.parametrize("with_text_encoder", [False, True])
def test_diffusers_load_lora_weights_matches(tiny_pipeline_dir: Path, tmp_path: Path, with_text_encoder: bool) -> None:
    from diffusers import StableDiffusionPipeline

    from deltatune.diffusion import TEXT_ENCODER_TARGETS

    model = load_pipeline(tiny_pipeline_dir)
    te = TEXT_ENCODER_TARGETS if with_text_encoder else None
    apply_lora(model, LoraConfig(r=2, alpha=6, target_modules=lora_target_regex(text_encoder_modules=te)))
    _force_nonzero(model)
    save_diffusers_lora(model, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / LORA_WEIGHTS_NAME))
    assert any(k.startswith("unet.") and k.endswith(".to_q.lora.down.weight") for k in keys)
    assert any(k.endswith(".to_out.0.lora.up.weight") for k in keys)
    if with_text_encoder:
        assert any(k.startswith("text_encoder.") and k.endswith("q_proj.lora_linear_layer.up.weight") for k in keys)

    noisy, t, ids = _unet_inputs(model)
    with torch.no_grad():
        emb = model.encode_prompt(ids)
        ours = model(noisy, t, encoder_hidden_states=emb)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        ref_emb = pipe.text_encoder(ids)[0]
        ref = pipe.unet(noisy, t, ref_emb).sample
        base = load_pipeline(tiny_pipeline_dir)(noisy, t, input_ids=ids)
    torch.testing.assert_close(ref_emb, emb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref, ours, rtol=1e-5, atol=1e-6)
    assert (ours - base).abs().max() > 1e-3  # the adapter really changes the output

    # Our own loader reads the file back to the same function.
    again = load_pipeline(tiny_pipeline_dir)
    load_diffusers_lora(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(noisy, t, input_ids=ids), ours, rtol=1e-5, atol=1e-6)


def test_zero_adapter_images_equal_base(tiny_pipeline_dir: Path) -> None:
    """B = 0 at init: the adapted pipeline samples exactly the base pipeline's images."""
    base = load_pipeline(tiny_pipeline_dir)
    model = load_pipeline(tiny_pipeline_dir)
    apply_lora(model, LoraConfig(r=2, alpha=2, target_modules=lora_target_regex(text_encoder_modules=("q_proj",))))
    prompts, seeds = ["a photo of a bag", "a sks bag"], [3, 4]
    want = base.sample(prompts, seeds, steps=3)
    torch.testing.assert_close(model.sample(prompts, seeds, steps=3), want, rtol=0, atol=0)
    _force_nonzero(model)
    assert (model.sample(prompts, seeds, steps=3) - want).abs().max() > 1e-4


def test_full_trains_unet_only(tiny_model) -> None:
    freeze_for_full(tiny_model, train_text_encoder=False)
    assert all(p.requires_grad for p in tiny_model.unet.parameters())
    assert not any(p.requires_grad for p in tiny_model.text_encoder.parameters())
    freeze_for_full(tiny_model, train_text_encoder=True)
    assert all(p.requires_grad for p in tiny_model.text_encoder.parameters())
    assert not any(p.requires_grad for p in tiny_model.vae.parameters())
