"""Each row of a DreamBooth batch carries its own image and its own prompt's embedding (instance vs
prior), with the text encoder frozen (precomputed embeddings) and training (encoded in the forward)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltatune import lora_layers
from deltatune.diffusion import (
    DreamBoothSpec,
    apply_lora,
    augment,
    load_image_dir,
    lora_target_regex,
    loss_sum,
    pair_rows,
    prepare,
)
from deltatune.methods.lora_config import LoraConfig

INST, CLS = "a photo of a sks bag", "a photo of a bag"


def _spec(tmp_path: Path, write_images, **kw) -> DreamBoothSpec:
    write_images(tmp_path / "inst", 3, seed=1)
    return DreamBoothSpec(instance_dir=str(tmp_path / "inst"), instance_prompt=INST, class_prompt=CLS,
                          with_prior_preservation=True, class_dir=str(tmp_path / "cls"), num_class_images=4,
                          sample_steps=2, precompute_latents=False, **kw)


def _capture(model):
    seen: dict[str, torch.Tensor] = {}

    def hook(_mod, args, kwargs):
        seen["embeds"] = (args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]).detach().clone()

    return seen, model.unet.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_rows_pair_image_and_prompt(tiny_model, tmp_path: Path, write_images, train_text_encoder: bool) -> None:
    spec = _spec(tmp_path, write_images)
    data = prepare(tiny_model, spec, progress=False)
    te = ("q_proj", "k_proj", "v_proj", "out_proj") if train_text_encoder else None
    apply_lora(tiny_model, LoraConfig(r=2, alpha=2, target_modules=lora_target_regex(text_encoder_modules=te)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(tiny_model):
            _, b = layer.factors("default")
            b.copy_(torch.randn(b.shape, generator=g) * 0.5)  # an adapted text encoder encodes differently
    pairs = [(0, 1), (2, 3), (1, 0)]
    batch = data.collate(pairs)
    assert batch["is_prior"].tolist() == [False, True, False, True, False, True]
    inst = load_image_dir(tmp_path / "inst")
    cls = load_image_dir(tmp_path / "cls")
    sources = [inst[0], cls[1], inst[2], cls[3], inst[1], cls[0]]
    for k, src in enumerate(sources):
        torch.testing.assert_close(batch["pixels"][k], augment(src, data.aug))
    seen, handle = _capture(tiny_model)
    try:
        loss = loss_sum(tiny_model, batch, prior_weight=1.0)
    finally:
        handle.remove()
    with torch.no_grad():
        inst_emb = tiny_model.encode_prompt(tiny_model.tokenize([INST]))[0]
        cls_emb = tiny_model.encode_prompt(tiny_model.tokenize([CLS]))[0]
    for k in range(6):
        want = cls_emb if batch["is_prior"][k] else inst_emb
        torch.testing.assert_close(seen["embeds"][k], want, rtol=1e-5, atol=1e-6)
    frozen = data.prompt_embeds
    assert frozen is not None
    if train_text_encoder:
        # The precomputed (frozen) embeddings must not be used once the text encoder trains.
        assert (frozen[0] - inst_emb).abs().max() > 1e-4
        loss.backward()
        te_grads = [p.grad for n, p in tiny_model.named_parameters() if n.startswith("text_encoder") and p.requires_grad]
        assert te_grads and all(gr is not None and gr.abs().sum() > 0 for gr in te_grads)
    else:
        torch.testing.assert_close(frozen[0], inst_emb)


def test_precomputed_latents_equal_vae_of_the_same_rows(tiny_model, tmp_path: Path, write_images) -> None:
    import dataclasses

    spec = dataclasses.replace(_spec(tmp_path, write_images), precompute_latents=True, random_flip=True)
    data = prepare(tiny_model, spec, progress=False)
    assert all(len(ex.latents) == 2 and ex.pixels is None for ex in data.instance + data.prior)
    inst = load_image_dir(tmp_path / "inst")
    mean, std = tiny_model.latent_dist(augment(inst[2], data.aug.__class__(data.aug.resolution))[None])
    torch.testing.assert_close(data.instance[2].latents[0][0], mean[0])
    torch.testing.assert_close(data.instance[2].latents[1][0], tiny_model.latent_dist(
        augment(inst[2], data.aug.__class__(data.aug.resolution))[None].flip(-1))[0][0])
    batch = data.collate([(2, 0)])
    assert batch["latent_mean"].shape[0] == 2 and batch["is_prior"].tolist() == [False, True]
    assert torch.isfinite(loss_sum(tiny_model, batch))


def test_pairs_cycle_through_both_sets() -> None:
    assert pair_rows(2, 5) == [(0, 0), (1, 1), (0, 2), (1, 3), (0, 4)]
    assert pair_rows(3, 0) == [(0, None), (1, None), (2, None)]
    with pytest.raises(ValueError, match="at least one instance"):
        pair_rows(0, 3)
