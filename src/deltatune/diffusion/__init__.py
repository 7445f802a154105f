"""DreamBooth with prior preservation on Stable Diffusion-layout pipelines (MISSION §4).

    model = load_pipeline("path/to/sd")                         # DiffusionModel: unet + text_encoder
    apply_lora(model, LoraConfig(r=4, alpha=4, target_modules=lora_target_regex()))
    data = prepare(model, DreamBoothSpec(instance_dir=..., instance_prompt="a sks dog",
                                         class_prompt="a dog", with_prior_preservation=True, class_dir=...))
    loss = loss_sum(model, data.collate(pairs), prior_weight=1.0)   # inside deltatune's one training loop
    save_diffusers_lora(model, out)  # StableDiffusionPipeline.from_pretrained(base).load_lora_weights(out)

Needs ``diffusers`` (a runtime dependency of this subpackage only; ``import deltatune`` does not load it).
"""

from .adapters import (
    LORA_WEIGHTS_NAME,
    TEXT_ENCODER_TARGETS,
    UNET_TARGETS,
    apply_lora,
    diffusers_lora_state_dict,
    freeze_for_full,
    load_diffusers_lora,
    lora_target_regex,
    save_diffusers_lora,
)
from .batch import DreamBoothData, DreamBoothSpec, Example, loss_sum, prepare
from .data import Augment, augment, class_images, load_image_dir, pair_rows
from .loss import diffusion_target, min_snr_weights, per_row_mse, prior_preservation_loss, split_rows
from .pipeline import DiffusionModel, base_fingerprint, identifier_warning, load_pipeline, save_grid

__all__ = [
    "LORA_WEIGHTS_NAME", "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "apply_lora", "diffusers_lora_state_dict",
    "freeze_for_full", "load_diffusers_lora", "lora_target_regex", "save_diffusers_lora", "DreamBoothData",
    "DreamBoothSpec", "Example", "loss_sum", "prepare", "Augment", "augment", "class_images", "load_image_dir",
    "pair_rows", "diffusion_target", "min_snr_weights", "per_row_mse", "prior_preservation_loss", "split_rows",
    "DiffusionModel", "base_fingerprint", "identifier_warning", "load_pipeline", "save_grid",
]
