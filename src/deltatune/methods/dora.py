"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): the adapted weight is split into a
trainable magnitude and a direction that LoRA moves,

    W' = m ⊙ (W₀ + s·BA) / ‖W₀ + s·BA‖_c          m ∈ ℝ^d, m₀ = ‖W₀‖_c so W' = W₀ at the start

where ‖·‖_c is the L2 norm of each output row of the (d, k) weight (paper Eq. 5; PEFT's
``get_weight_norm``). The norm is detached from the graph (paper §4.3), so m gets the gradient of
the scale and B, A only that of the direction.

Forward without materialising W' (PEFT's ``DoraLinearLayer.forward``, same math):
    f = m / ‖W₀ + s·BA‖_c                                   (d,)
    h = f ⊙ (W₀x + s·B(Ax)) + b  = base(x) + (f−1) ⊙ W₀x + f ⊙ s·B(Ax)
and the norm itself from small products instead of the (d, k) sum W₀ + s·BA:
    ‖W₀ + s·BA‖²_row = ‖W₀‖²_row + 2s·rowsum(B ⊙ W₀Aᵀ) + s²·rowsum(B(AAᵀ) ⊙ B)       O(dkr)

Weights are handled in the (d, k) "output × input" view for every kind: nn.Linear W (d, k) as is,
GPT-2 Conv1D W (k, d) and nn.Embedding W (V, d) transposed — so ΔW = BA and the norm runs over
the input (k or V) for each of the d outputs, as in PEFT (fan_in_fan_out / DoraEmbeddingLayer).

State-dict keys equal PEFT's: ``<path>.lora_magnitude_vector.<adapter>.weight`` in memory,
``base_model.model.<path>.lora_magnitude_vector`` in the file (:func:`file_tensors`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoraLayer

__all__ = ["DoraLayer", "upgrade", "file_tensors", "MAGNITUDE_KEY"]

#: Suffix of the magnitude tensor in a PEFT adapter file (after ``base_model.model.<path>``).
MAGNITUDE_KEY = "lora_magnitude_vector"


class _Magnitude(nn.Module):
    """m (d,) held as ``.weight`` so the state-dict key is PEFT's ``lora_magnitude_vector.<name>.weight``."""

    def __init__(self, m: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(m)


class DoraLayer(LoraLayer):
    """A :class:`LoraLayer` whose adapters may carry a magnitude vector (then they are DoRA adapters).

    Plain LoRA adapters on the same layer keep LoRA's math; merge/unmerge handle both kinds.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if self.kind == "conv2d":
            raise TypeError("DoRA supports nn.Linear, GPT-2 Conv1D and nn.Embedding layers, not Conv2d")
        self.lora_magnitude_vector = nn.ModuleDict()
        # f = m/‖W₀+s·BA‖ of each merged DoRA adapter, taken when it was merged: W₀ is recovered from
        # the merged weight with them (see _pristine), since the norm depends on W₀.
        self._merged_f: dict[str, torch.Tensor] = {}

    @classmethod
    def from_lora(cls, layer: LoraLayer) -> DoraLayer:
        """The same layer (same parameters, adapters, merge state) as a DoraLayer."""
        new = cls(layer.base_layer)
        for key, value in vars(layer).items():
            if key in ("_modules", "_parameters", "_buffers"):
                getattr(new, key).update(value)
            elif not key.startswith("_") and key != "training":
                new.__dict__[key] = value
        new.train(layer.training)
        return new

    # ---------------------------------------------------------------- adapters
    def enable_dora(self, name: str) -> None:
        """Make adapter ``name`` a DoRA adapter: m = ‖W₀ + s·BA‖ so the layer's output is unchanged."""
        a, _ = self.factors(name)
        m = self.weight_norm(name).to(a.dtype)
        self.lora_magnitude_vector[name] = _Magnitude(m)

    def is_dora(self, name: str) -> bool:
        return name in self.lora_magnitude_vector

    def magnitude(self, name: str) -> torch.Tensor:
        w = self.lora_magnitude_vector[name].weight
        assert isinstance(w, torch.Tensor)
        return w

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """What adapter ``name`` trains on this layer: A, B and (DoRA) m."""
        params = list(self.factors(name))
        if self.is_dora(name):
            params.append(self.magnitude(name))
        return params  # type: ignore[return-value]

    def delete(self, name: str) -> None:
        super().delete(name)
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    # ---------------------------------------------------------------- weights in the (d, k) view
    def _dk(self, w: torch.Tensor) -> torch.Tensor:
        return w if self.kind == "linear" else w.t()

    def _dense_base(self) -> torch.Tensor:
        """The base weight in its own layout, floating point (a 4-bit base via its dequantized_weight())."""
        dequantize = getattr(self.base_layer, "dequantized_weight", None)  # quant.Linear4bit (QDoRA)
        w = dequantize() if callable(dequantize) else self.base_weight()
        if not w.is_floating_point():
            raise TypeError(f"DoRA needs a floating-point base weight; {type(self.base_layer).__name__} holds {w.dtype}")
        return w

    def _pristine(self) -> torch.Tensor:
        """W₀ (d, k), the weight with every merged adapter taken out. With LoRA deltas s·BA and DoRA
        deltas (f−1)⊙W₀ + f⊙s·BA merged, W = W₀⊙(1 + Σ(f−1)) + Σ s·BA + Σ f⊙s·BA, solved row-wise."""
        w = self._dk(self._dense_base())
        if not self.merged:
            return w
        num = w.float().clone()
        c = torch.ones(self.out_features, device=w.device)
        for n in self.merged:
            a, b = self.factors(n)
            sba = (b.detach().float() @ a.detach().float()) * self.adapters[n].scale  # (d, k)
            if n in self._merged_f:
                f = self._merged_f[n]
                num -= f[:, None] * sba
                c += f - 1
            else:
                num -= sba
        return num / c[:, None]

    @torch.no_grad()
    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W₀ + s·BA‖ per output row (d,), fp32, without forming the (d, k) sum (see module doc)."""
        a, b = (t.detach().float() for t in self.factors(name))  # (r, k), (d, r)
        s = self.adapters[name].scale
        w0 = self._pristine()  # (d, k)
        w0_sq = torch.linalg.vector_norm(w0, dim=1, dtype=torch.float32).square()  # (d,)
        wa = (w0 @ a.t().to(w0.dtype)).float()  # (d, r) = W₀Aᵀ
        cross = (b * wa).sum(1)  # ⟨W₀_i, (BA)_i⟩
        ba_sq = ((b @ (a @ a.t())) * b).sum(1)  # ‖(BA)_i‖²
        return (w0_sq + 2 * s * cross + s * s * ba_sq).clamp_min(0).sqrt()

    def _scale(self, name: str) -> torch.Tensor:
        """f = m / ‖W₀ + s·BA‖ (d,): differentiable in m only (§4.3)."""
        return self.magnitude(name) / self.weight_norm(name)

    # ---------------------------------------------------------------- merge
    def _merge_form(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W' − W₀ in the (d, k) view, f) for DoRA adapter ``name``, fp32, by the plain formula
        (merging is rare, and this is the reference form the fast forward must agree with)."""
        w0 = self._pristine().float()
        a, b = (t.detach().float() for t in self.factors(name))
        sba = (b @ a) * self.adapters[name].scale  # (d, k)
        f = self._merged_f.get(name)
        if f is None:
            f = self.magnitude(name).detach().float() / torch.linalg.vector_norm(w0 + sba, dim=1)
        return (f[:, None] - 1) * w0 + f[:, None] * sba, f

    def delta(self, name: str) -> torch.Tensor:
        """W' − W₀ in the base weight's layout, fp32: (f−1)⊙W₀ + f⊙s·BA for a DoRA adapter."""
        if not self.is_dora(name):
            return super().delta(name)
        return self._dk(self._merge_form(name)[0])

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else list(self.active):
            if name in self.merged:
                continue
            if self.is_dora(name):
                delta, self._merged_f[name] = self._merge_form(name)
                delta = self._dk(delta)
            else:
                delta = super().delta(name)
            self._add_to_base(delta)  # a 4-bit base is requantized (QDoRA)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w0 = self._dk(self._pristine()).float()
        self._add_to_base(w0 - self._dense_base().float())  # W ← W₀
        self.merged.clear()
        self._merged_f.clear()

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        todo = [n for n in self.active if n not in self.merged]
        dora = [n for n in todo if self.is_dora(n)]
        if self.disabled or self.per_sample is not None or not dora:
            return super().forward(x, *args, **kwargs)
        if self.kind == "embedding":
            out = self.base_layer(x, *args, **kwargs)
            y0 = out if not self.merged else self._base_apply(x, self._dk(self._pristine()))
            for name in todo:
                term = self._dora_term(x, name, y0) if self.is_dora(name) else self._delta_out(x, name)
                out = out + term.to(out.dtype)
            return out
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, k)
        y = self.base_layer(x2)  # (N, d) = W₀x + b (+ merged adapters)
        bias = getattr(self.base_layer, "bias", None)
        name = dora[0]
        ad = self.adapters[name]
        if todo == dora and len(dora) == 1 and not self.merged and not (ad.dropout > 0.0 and self.training):
            # The training fast path, fused: h = f ⊙ (W₀x + s·B(Ax)) + b. One (N, d) tensor (z) is
            # kept for backward (∂h/∂m needs it); everything else is in place on the base output.
            a, b = self.factors(name)
            z = y.sub_(bias) if bias is not None else y
            xa = F.linear(x2, a if torch.is_autocast_enabled() else a.to(x2.dtype))  # (N, r)
            z = z.addmm_(xa.to(z.dtype), b.t().to(z.dtype), alpha=ad.scale)  # (N, d)
            # f stays fp32 (as in PEFT): in bf16 it would move in steps of 2⁻⁸, hiding small updates of m.
            out = (z * self._scale(name)).to(z.dtype)
            if bias is not None:
                out = out.add_(bias)
            return out.view(*lead, out.shape[-1])
        y0 = (y - bias if bias is not None else y) if not self.merged else self._base_apply(x2, self._dk(self._pristine()))
        out = y
        for n in todo:  # out of place: y0 may alias y
            out = out + (self._dora_term(x2, n, y0) if self.is_dora(n) else self._delta_out(x2, n)).to(out.dtype)
        return out.view(*lead, out.shape[-1])

    def _base_apply(self, x: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        """W₀x without bias, for the pristine W₀ (d, k): needed when other adapters are merged, or on
        dropped inputs."""
        if self.kind == "embedding":
            base = self.base_layer
            assert isinstance(base, nn.Embedding)
            return F.embedding(x, w0.t(), base.padding_idx, base.max_norm, base.norm_type,
                               base.scale_grad_by_freq, base.sparse)
        return F.linear(x, w0.to(x.dtype))

    def _dora_term(self, x: torch.Tensor, name: str, y0: torch.Tensor | None) -> torch.Tensor:
        """(f−1) ⊙ W₀x + f ⊙ s·B(Ax), added to the base output. With dropout in training, x is dropped
        for both terms, and W₀·drop(x) needs its own product (as in PEFT and the paper's code)."""
        ad = self.adapters[name]
        if self.kind != "embedding" and ad.dropout > 0.0 and self.training:
            x = F.dropout(x, ad.dropout, True)
            y0 = None
        if y0 is None:
            y0 = self._base_apply(x, self._dk(self._pristine()))
        lora = LoraLayer._delta_out(self, x, name) if self.kind == "embedding" else self._lora_out(x, name)
        f = self._scale(name)  # fp32, see forward
        return ((f - 1) * y0 + f * lora).to(y0.dtype)

    def _lora_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * self.adapters[name].scale

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        # Per-sample routing (LoraLayer._forward_per_sample) adds this to the base output of its rows.
        if not self.is_dora(name):
            return super()._delta_out(x, name)
        return self._dora_term(x, name, None)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", dora={list(self.lora_magnitude_vector)}"


def upgrade(layer: LoraLayer) -> DoraLayer:
    """``layer`` itself if it is a DoraLayer, else the same layer as a DoraLayer."""
    if isinstance(layer, DoraLayer):
        return layer
    if type(layer) is not LoraLayer:
        raise TypeError(f"DoRA cannot be added to a {type(layer).__name__}")
    return DoraLayer.from_lora(layer)


def file_tensors(layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
    """The DoRA tensors of adapter ``name`` under PEFT's file suffixes (empty for plain LoRA)."""
    if isinstance(layer, DoraLayer) and layer.is_dora(name):
        return {MAGNITUDE_KEY: layer.magnitude(name)}
    return {}


def load_magnitude(layer: nn.Module, name: str, m: torch.Tensor) -> None:
    """Copy a magnitude read from a file into DoRA adapter ``name`` (shapes checked by the caller)."""
    assert isinstance(layer, DoraLayer) and layer.is_dora(name)
    with torch.no_grad():
        layer.magnitude(name).copy_(m)
