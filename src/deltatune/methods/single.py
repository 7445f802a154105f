"""What VeRA and AdaLoRA layers share: a frozen ``base_layer`` (nn.Linear or GPT-2 Conv1D) with
exactly one adapter (VeRA's projections are model-wide and AdaLoRA's ranks are allocated across
the model, so neither stacks named adapters as :class:`LoraLayer` does), a flat ``(N, k)`` forward
that adds the adapter in place into the base output, and merge / unmerge / unload by adding the
layer's ΔW to the base weight (:func:`add_to_weight`, 4-bit bases included)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .lora import add_to_weight, base_shape, supported_base, weight_checksum, weight_of


class SingleAdapterLayer(nn.Module):
    """Base class: subclasses define :meth:`delta` (ΔW, fp32, in the base weight's layout) and
    :meth:`add_adapter` (the adapter's output added into the base output)."""

    method: ClassVar[str] = "adapter"  # for messages: "VeRA", "AdaLoRA"

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        kind = supported_base(base_layer)
        if kind not in ("linear", "conv1d"):
            raise TypeError(f"{self.method} supports nn.Linear and Conv1D layers, not {type(base_layer).__name__}")
        self.kind = kind
        self.base_layer = base_layer
        self.in_features, self.out_features = base_shape(base_layer)
        w = weight_of(base_layer)
        self.base_checksum = weight_checksum(w)  # file fingerprint of the pristine base (see io.fingerprint)
        # fp32 masters unless the base is fp32/fp64 already (as LoraLayer does).
        self.factory: dict[str, Any] = {
            "device": w.device, "dtype": w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32}
        self.name = name
        self.merged = False
        self.disabled = False

    def delta(self) -> torch.Tensor:
        raise NotImplementedError

    def has_adapter(self) -> bool:
        """False when the adapter contributes nothing by construction (AdaLoRA at rank 0)."""
        return True

    def add_adapter(self, out: torch.Tensor, x2: torch.Tensor, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """out (N, d) base output += adapter(x2 (N, k)); ``x`` is the caller's un-flattened input and
        ``dt`` the compute dtype (the autocast dtype under autocast)."""
        raise NotImplementedError

    def merge(self) -> None:
        if not self.merged:
            add_to_weight(self.base_layer, self.delta())
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            add_to_weight(self.base_layer, -self.delta())
            self.merged = False

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.disabled and self.merged:
            raise RuntimeError(f"the {self.method} adapter is merged into this layer; unmerge before disabling it")
        if self.disabled or self.merged or not self.has_adapter():
            return self.base_layer(x, *args, **kwargs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, k)
        out = self.base_layer(x2)  # (N, d), a fresh tensor we own
        # Compute in the activations' dtype (the autocast dtype under autocast), casting the small
        # operands, never x; gradients reach the fp32 masters through the casts.
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = self.add_adapter(out, x2, x, dt)
        return out.view(*lead, out.shape[-1])


def unload_layers(model: nn.Module, layers: Iterable[tuple[str, SingleAdapterLayer]], merge_adapter: bool) -> None:
    """Put each layer's base back in its place, merging the adapter first unless ``merge_adapter`` is False."""
    from ..inject import _set_module

    for path, layer in list(layers):
        if merge_adapter:
            layer.merge()
        else:
            layer.unmerge()
        _set_module(model, path, layer.base_layer)
