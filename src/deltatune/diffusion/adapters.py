"""Adapters on a :class:`~deltatune.diffusion.pipeline.DiffusionModel`, and diffusers' LoRA file layout.

LoRA is deltatune's own (``deltatune.inject`` with a :class:`LoraConfig`): by default on the UNet's
attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (and ``add_k_proj``/``add_v_proj``
where the UNet has them), optionally on the text encoder's ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``. The VAE is outside the module tree and never trains.

The file is ``pytorch_lora_weights.safetensors`` with the keys diffusers' ``train_dreambooth_lora.py``
writes (its ``convert_state_dict_to_diffusers`` over PEFT's names, prefixed by the component)::

    unet.<path>.to_q.lora.down.weight            (r, k)    = A
    unet.<path>.to_q.lora.up.weight              (d, r)    = (α/r)·B
    text_encoder.<path>.q_proj.lora_linear_layer.down.weight / .up.weight
    unet.<path>.add_k_proj.lora_A.weight / .lora_B.weight   (names its converter leaves as PEFT's)

diffusers' loader assumes α = r (scale 1) unless the file carries ``lora_adapter_metadata``, so the
scale α/r (or α/√r) is folded into the up matrix: ``load_lora_weights`` then computes exactly
deltatune's s·B·A, and the file needs no metadata.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import inject, lora_layers
from ..io import atomic_write_bytes
from ..methods.lora_config import LoraConfig

__all__ = ["UNET_TARGETS", "TEXT_ENCODER_TARGETS", "lora_target_regex", "apply_lora", "freeze_for_full",
           "diffusers_lora_state_dict", "save_diffusers_lora", "load_diffusers_lora", "LORA_WEIGHTS_NAME"]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_ENCODER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
# diffusers' PEFT_TO_DIFFUSERS renames (utils/state_dict_utils.py): leaf → (down, up) suffix.
_UNET_RENAMED = {"to_q", "to_k", "to_v", "to_out.0"}
_TEXT_RENAMED = {"q_proj", "k_proj", "v_proj", "out_proj"}


def lora_target_regex(unet_modules: tuple[str, ...] | list[str] = UNET_TARGETS,
                      text_encoder_modules: tuple[str, ...] | list[str] | None = None) -> str:
    """A ``LoraConfig.target_modules`` regex (full match on the module path) that picks the named
    leaves inside ``unet.`` and, when given, inside ``text_encoder.``."""
    def alt(names: tuple[str, ...] | list[str]) -> str:
        return "|".join(re.escape(n) for n in names)

    pat = rf"unet\..*\.(?:{alt(unet_modules)})"
    if text_encoder_modules:
        pat += rf"|text_encoder\..*\.(?:{alt(text_encoder_modules)})"
    return pat


def apply_lora(model: nn.Module, config: LoraConfig, name: str = "default") -> nn.Module:
    """deltatune's LoRA on the DiffusionModel (targets from ``config.target_modules``, e.g.
    :func:`lora_target_regex`); everything else frozen."""
    if config.use_dora:
        raise ValueError("DreamBooth files use diffusers' LoRA layout, which has no DoRA magnitude here; use plain LoRA")
    return inject(model, config, name)


def freeze_for_full(model: nn.Module, train_text_encoder: bool) -> nn.Module:
    """Full fine-tuning of a DiffusionModel: the UNet trains, the text encoder only when asked."""
    model.requires_grad_(False)
    model.unet.requires_grad_(True)  # type: ignore[union-attr,operator]
    if train_text_encoder:
        model.text_encoder.requires_grad_(True)  # type: ignore[union-attr,operator]
    return model


def _suffixes(component: str, rest: str) -> tuple[str, str]:
    leafs = _UNET_RENAMED if component == "unet" else _TEXT_RENAMED
    for leaf in leafs:
        if rest == leaf or rest.endswith("." + leaf):
            return (".lora.down.weight", ".lora.up.weight") if component == "unet" else \
                (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight")
    return ".lora_A.weight", ".lora_B.weight"


def diffusers_lora_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under diffusers' keys, scale folded into ``up`` (fp32, contiguous)."""
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        component, _, rest = path.partition(".")
        if component not in ("unet", "text_encoder"):
            raise ValueError(f"adapted module {path!r} is outside unet/text_encoder; diffusers' layout cannot hold it")
        a, b = layer.factors(name)
        down, up = _suffixes(component, rest)
        out[f"{component}.{rest}{down}"] = a.detach().float().contiguous().cpu()
        out[f"{component}.{rest}{up}"] = (b.detach().float() * layer.adapters[name].scale).contiguous().cpu()
    if not out:
        raise ValueError(f"no LoRA adapter {name!r} on this model")
    return out


def save_diffusers_lora(model: nn.Module, out: str | Path, name: str = "default",
                        info: dict[str, Any] | None = None) -> Path:
    """Write ``out/pytorch_lora_weights.safetensors`` (+ ``dreambooth.json`` with ``info``)."""
    from safetensors.torch import save

    out = Path(out)
    tensors = diffusers_lora_state_dict(model, name)
    atomic_write_bytes(out / LORA_WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    if info is not None:
        atomic_write_bytes(out / "dreambooth.json", (json.dumps(info, indent=2) + "\n").encode())
    return out / LORA_WEIGHTS_NAME


_KEY = re.compile(r"^(unet|text_encoder)\.(.+?)(\.lora\.(down|up)|\.lora_linear_layer\.(down|up)|\.lora_(A|B))\.weight$")


def load_diffusers_lora(model: nn.Module, path: str | Path, name: str = "default", trainable: bool = False) -> nn.Module:
    """Add adapter ``name`` from a diffusers-layout LoRA file (ours or the peers') to a DiffusionModel.
    The file's scale is already folded in, so α = r."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / LORA_WEIGHTS_NAME if path.is_dir() else path
    if not file.exists():
        raise ValueError(f"{file}: no LoRA file")
    sd = load_file(str(file))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"{file}: key {key!r} is not a diffusers LoRA key (…lora.down/up, lora_A/B)")
        which = "A" if (m.group(4) or m.group(5) or m.group(6)) in ("down", "A") else "B"
        factors.setdefault(f"{m.group(1)}.{m.group(2)}", {})[which] = t
    for mod, ab in factors.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{file}: module {mod!r} has only lora {sorted(ab)}")
    ranks = {mod: int(ab["A"].shape[0]) for mod, ab in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    cfg = LoraConfig(r=r, alpha=float(r), target_modules=sorted(factors),
                     rank_pattern={re.escape(m): k for m, k in ranks.items() if k != r},
                     alpha_pattern={re.escape(m): float(k) for m, k in ranks.items() if k != r})
    inject(model, cfg, name)
    with torch.no_grad():
        for mpath, layer in lora_layers(model):
            if mpath in factors:
                a, b = layer.factors(name)
                a.copy_(factors[mpath]["A"].reshape(a.shape))
                b.copy_(factors[mpath]["B"].reshape(b.shape))
                a.requires_grad_(trainable)
                b.requires_grad_(trainable)
    return model
