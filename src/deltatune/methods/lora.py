"""LoRA layer (Hu et al. 2021; MISSION §2): h = W₀x + s·B(A·drop(x)).

One wrapper class for every supported base layer. The wrapper keeps the frozen layer as
``base_layer`` and the adapters in ``lora_A`` / ``lora_B`` (``lora_embedding_A`` / ``_B`` for
embeddings) keyed by adapter name — exactly HF PEFT's module layout, so a wrapped model's
``state_dict()`` keys equal PEFT's and file translation (``io.py``) is a prefix and a name.

Shapes (k = in features, d = out features, r = rank):
  nn.Linear      W₀ (d, k)         A (r, k)            B (d, r)
  GPT-2 Conv1D   W₀ (k, d)         A (r, k)            B (d, r)      ΔW stored transposed
  nn.Embedding   W₀ (V, d)         A (r, V) [PEFT]     B (d, r)      Δ = onehot(ids)·Aᵀ·Bᵀ
  nn.Conv2d      W₀ (d, k, kh, kw) A conv (r, k, kh, kw), B conv 1×1 (d, r, 1, 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoraLayer", "INIT_SCHEMES", "supported_base", "delta_weight"]

# GPT-2 style Conv1D: y = x @ W + b with W (k, d)
from transformers.pytorch_utils import Conv1D


def _init_kaiming(a: torch.Tensor) -> None:
    # PEFT's default: the same init nn.Linear gives its own weight (Kaiming-uniform, a = √5).
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))


def _init_gaussian(a: torch.Tensor) -> None:
    # The lecture's scheme: N(0, 1/k) with k the input width (fan-in), σ = 1/√k.
    fan_in = a[0].numel()
    nn.init.normal_(a, std=1.0 / math.sqrt(fan_in))


#: Named A-initialisation schemes; B is always zero so ΔW = 0 at the start.
INIT_SCHEMES: dict[str, Callable[[torch.Tensor], None]] = {
    "kaiming": _init_kaiming,
    "gaussian": _init_gaussian,
}


def supported_base(module: nn.Module) -> str | None:
    """The kind of base layer LoRA can wrap ('linear', 'conv1d', 'embedding', 'conv2d'), or None."""
    if isinstance(module, nn.Linear) or getattr(module, "is_deltatune_linear", False):
        return "linear"
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv2d" if module.groups == 1 else None
    return None


def base_shape(module: nn.Module) -> tuple[int, int]:
    """(k, d): the input width the adapter reads and the output width it writes."""
    kind = supported_base(module)
    if kind == "linear":
        return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]
    if kind == "conv1d":
        k, d = weight_of(module).shape
        return int(k), int(d)
    if kind == "embedding":
        return int(module.num_embeddings), int(module.embedding_dim)  # type: ignore[arg-type]
    if kind == "conv2d":
        return int(module.in_channels), int(module.out_channels)  # type: ignore[arg-type]
    raise TypeError(f"LoRA cannot wrap {type(module).__name__}")


@dataclass
class _Adapter:
    r: int
    alpha: float
    scale: float
    dropout: float


class LoraLayer(nn.Module):
    """Frozen ``base_layer`` plus any number of named low-rank adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        kind = supported_base(base_layer)
        if kind is None:
            raise TypeError(f"LoRA cannot wrap {type(base_layer).__name__}")
        self.kind = kind
        self.base_layer = base_layer
        self.in_features, self.out_features = base_shape(base_layer)
        # Σ|w| over a strided sample of the pristine base weight, for the adapter file's base
        # fingerprint (taken now, while nothing is merged into it).
        self.base_checksum = weight_checksum(weight_of(base_layer))
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.adapters: dict[str, _Adapter] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        # Per-sample adapter selection for the next forward calls: one name (or None = base) per row
        # of dim 0. Set by deltatune.adapter_per_sample(); None means "use self.active for all rows".
        self.per_sample: list[str | None] | None = None
        # Mixing weights λ of active adapters (deltatune.compose.set_weighted): h = W₀x + Σ λₙ·sₙ·Bₙ(Aₙx),
        # computed in the factors (ΔW never formed). A float, or a 0-d tensor that trains (method 'mix').
        # Absent = 1; cleared by set_active.
        self.weights: dict[str, float | torch.Tensor] = {}

    # ---------------------------------------------------------------- construction
    def add(self, name: str, r: int, alpha: float, *, dropout: float = 0.0, rslora: bool = False,
            init: str = "kaiming") -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if init not in INIT_SCHEMES:
            raise ValueError(f"unknown LoRA init {init!r}; choose one of {sorted(INIT_SCHEMES)}")
        w = self.base_weight()
        # Adapters keep fp32 master weights unless the base itself is fp32/fp64 already; a
        # quantized base (uint8 storage) also gets fp32.
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        factory: dict[str, Any] = {"device": w.device, "dtype": dtype}
        k, d = self.in_features, self.out_features
        if self.kind == "embedding":
            a = torch.empty(r, k, **factory)  # (r, V)
            INIT_SCHEMES[init](a)
            self.lora_embedding_A[name] = nn.Parameter(a)
            self.lora_embedding_B[name] = nn.Parameter(torch.zeros(d, r, **factory))  # (d, r)
        elif self.kind == "conv2d":
            base = self.base_layer
            assert isinstance(base, nn.Conv2d)
            conv_a = nn.Conv2d(k, r, base.kernel_size, base.stride, base.padding, base.dilation, bias=False, **factory)  # type: ignore[arg-type]
            INIT_SCHEMES[init](conv_a.weight)
            self.lora_A[name] = conv_a
            conv_b = nn.Conv2d(r, d, 1, 1, bias=False, **factory)
            self.lora_B[name] = conv_b
            nn.init.zeros_(conv_b.weight)
        else:
            lin_a = nn.Linear(k, r, bias=False, **factory)  # type: ignore[arg-type]
            INIT_SCHEMES[init](lin_a.weight)
            self.lora_A[name] = lin_a
            lin_b = nn.Linear(r, d, bias=False, **factory)
            nn.init.zeros_(lin_b.weight)
            self.lora_B[name] = lin_b
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.adapters[name] = _Adapter(r=r, alpha=alpha, scale=scale, dropout=dropout)

    def delete(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        self.adapters.pop(name)
        self.weights.pop(name, None)
        for store in (self.lora_A, self.lora_B, self.lora_embedding_A, self.lora_embedding_B):
            if name in store:
                del store[name]
        self.active = [a for a in self.active if a != name]

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as stored: A (r, k[, kh, kw]), B (d, r[, 1, 1])."""
        if self.kind == "embedding":
            return self.lora_embedding_A[name], self.lora_embedding_B[name]
        return weight_of(self.lora_A[name]), weight_of(self.lora_B[name])

    def base_weight(self) -> torch.Tensor:
        return weight_of(self.base_layer)

    # ---------------------------------------------------------------- merge
    def delta(self, name: str) -> torch.Tensor:
        """s·ΔW for adapter ``name`` in the base weight's layout and dtype-free fp32."""
        a, b = self.factors(name)
        w = self.weights.get(name, 1.0)  # a mixing weight may be a trainable tensor (method 'mix'): its value
        w = float(w.detach()) if isinstance(w, torch.Tensor) else float(w)
        return delta_weight(self.kind, a, b, self.adapters[name].scale * w)

    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else list(self.active):
            if name in self.merged:
                continue
            self._add_to_base(self.delta(name))
            self.merged.append(name)

    def unmerge(self) -> None:
        while self.merged:
            self._add_to_base(-self.delta(self.merged.pop()))

    def _add_to_base(self, delta: torch.Tensor) -> None:
        add_to_weight(self.base_layer, delta)

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError("adapters are merged into this layer; unmerge before disabling them")
            return self.base_layer(x, *args, **kwargs)
        todo = [n for n in self.active if n not in self.merged]
        if self.per_sample is not None:
            return self._forward_per_sample(x, args, kwargs)
        if not todo:
            return self.base_layer(x, *args, **kwargs)
        if self.kind in ("linear", "conv1d"):
            # Flatten to 2-D so the adapter's add is one in-place GEMM into the base output
            # (addmm_: out ← out + s·(xA)Bᵀ), no extra (N, d) temporaries.
            lead = x.shape[:-1]
            x2 = x.reshape(-1, x.shape[-1])  # (N, k)
            out = self.base_layer(x2)  # (N, d), a fresh tensor we own
            for name in todo:
                out = self._add_linear(out, x2, name)
            return out.view(*lead, out.shape[-1])
        out = self.base_layer(x, *args, **kwargs)
        for name in todo:
            out = out + self._delta_out(x, name).to(out.dtype)
        return out

    def _add_linear(self, out: torch.Tensor, x2: torch.Tensor, name: str) -> torch.Tensor:
        ad = self.adapters[name]
        a, b = self.factors(name)  # (r, k), (d, r)
        if ad.dropout > 0.0 and self.training:
            xa = DropoutProject.apply(x2, a, ad.dropout)  # (N, r), no dropped copy of x kept
        else:
            # Compute in the activations' dtype (bf16 under a bf16 base): casting the small
            # factors, never x. Gradients still reach the fp32 masters through the casts. Under
            # autocast F.linear casts by itself; the in-place addmm_ needs explicit dtypes.
            xa = F.linear(x2, a if torch.is_autocast_enabled() else a.to(x2.dtype))  # (N, r)
        lam = self.weights.get(name, 1.0)
        if isinstance(lam, torch.Tensor):
            xa = xa * lam.to(xa.dtype)  # (N, r): a trainable λ scales the rank-r activations, not ΔW
            lam = 1.0
        return out.addmm_(xa.to(out.dtype), b.t().to(out.dtype), alpha=ad.scale * lam)

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """λ·s·B(A·drop(x)) for any kind, out of place, shaped like the base output."""
        lam = self.weights.get(name)
        if lam is not None:
            return self._delta_out_unweighted(x, name) * lam
        return self._delta_out_unweighted(x, name)

    def _delta_out_unweighted(self, x: torch.Tensor, name: str) -> torch.Tensor:
        ad = self.adapters[name]
        if self.kind == "embedding":
            a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
            base = self.base_layer
            assert isinstance(base, nn.Embedding)
            # Row lookup in Aᵀ (V, r) is the adapter's "A·onehot(ids)"; same padding/max-norm
            # options as the base so PEFT parity holds.
            xa = F.embedding(x, a.t(), base.padding_idx, base.max_norm, base.norm_type,
                             base.scale_grad_by_freq, base.sparse)  # (..., r)
            return (xa @ b.t()) * ad.scale  # (..., d)
        if ad.dropout > 0.0 and self.training:
            x = F.dropout(x, ad.dropout, True)
        if self.kind == "conv2d":
            a_mod, b_mod = self.lora_A[name], self.lora_B[name]
            return b_mod(a_mod(x.to(weight_of(a_mod).dtype))) * ad.scale
        a, b = self.factors(name)
        return F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * ad.scale

    def _forward_per_sample(self, x: torch.Tensor, args: tuple[object, ...], kwargs: dict[str, object]) -> torch.Tensor:
        names = self.per_sample
        assert names is not None
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_per_sample got {len(names)} names for a batch of {x.shape[0]} rows")
        if self.merged:
            raise RuntimeError("per-sample adapters need unmerged adapters; call deltatune.unmerge(model) first")
        out = self.base_layer(x, *args, **kwargs)
        for name in sorted({n for n in names if n is not None}):
            if name not in self.adapters:
                continue  # this layer is not adapted by that adapter: base output for those rows
            idx = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            delta = self._delta_out(x.index_select(0, idx), name)
            # index_add is differentiable, so mixed-adapter batches also train (MISSION §9).
            out = out.index_add(0, idx, delta.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        parts = [f"{n}: r={a.r}, alpha={a.alpha:g}" for n, a in self.adapters.items()]
        return f"kind={self.kind}, adapters=[{'; '.join(parts)}], active={self.active}, merged={self.merged}"


def _keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(1-p) keep-mask (bool), from 16 random bits per element.

    torch's CPU bernoulli_ draws one 32-bit number per element and was ~70 % of the cost of a
    LoRA dropout step here; 64-bit draws split into four 16-bit lanes need a quarter of the draws.
    P(drop) = round(p·2¹⁶)/2¹⁶ (for p = 0.05: 0.0500031), and the caller rescales by the same
    effective p, so E[mask·x/(1-p)] = x exactly.
    """
    n = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:n].view(shape)  # uniform on [-2¹⁵, 2¹⁵)
    return lanes >= (-(2**15) + round(p * 2**16))


def effective_dropout(p: float) -> float:
    return round(p * 2**16) / 2**16


class DropoutProject(torch.autograd.Function):
    """xa = (drop(x) @ Aᵀ) for the LoRA input, keeping a 1-byte mask instead of the dropped copy
    of x (PEFT keeps a full-precision copy). x itself is already saved by the base layer.
    Shapes: x (N, k), A (r, k) → (N, r)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, p: float) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        keep = _keep_mask(x.shape, p, x.device)
        scale = 1.0 / (1.0 - effective_dropout(p))
        with torch.autocast(x.device.type, enabled=False):
            a_c = a.to(dtype)
            xa = torch.where(keep, x.to(dtype), 0) @ a_c.t() * scale
        ctx.save_for_backward(x, a, keep)
        ctx.scale, ctx.dtype = scale, dtype
        return xa

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, a, keep = ctx.saved_tensors
        g = grad.to(ctx.dtype) * ctx.scale  # (N, r)
        grad_x = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.where(keep, g @ a.to(ctx.dtype), 0).to(x.dtype)  # (N, k)
        if ctx.needs_input_grad[1]:
            grad_a = (g.t() @ torch.where(keep, x.to(ctx.dtype), 0)).to(a.dtype)  # (r, k)
        return grad_x, grad_a, None


@torch.no_grad()
def add_to_weight(base: nn.Module, delta: torch.Tensor) -> None:
    """W ← W + delta in the base layer's own layout (shared by every merging method). A 4-bit base
    is dequantized, updated and requantized (lossy: the rounding error this adds is what
    ``deltatune.quant.merge`` measures)."""
    requantize = getattr(base, "requantize_", None)
    if callable(requantize):
        requantize(base.dequantized_weight(torch.float32) + delta)  # type: ignore[operator]
        return
    w = weight_of(base)
    w.add_(delta.to(w.dtype))


def weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` as a tensor (nn.Module types it loosely)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w


_CHECKSUM_SAMPLES = 256


def weight_checksum(w: torch.Tensor) -> float:
    """Σ|w| over ≤256 evenly strided elements in fp64: cheap, and it changes if the base does
    (the base-model fingerprint in adapter files)."""
    flat = w.detach().reshape(-1)
    step = max(1, flat.numel() // _CHECKSUM_SAMPLES)
    return float(flat[::step][:_CHECKSUM_SAMPLES].double().abs().sum())


def delta_weight(kind: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s·ΔW in the base weight's layout, computed in fp32 (pure function; used by merge)."""
    a32, b32 = a.detach().float(), b.detach().float()
    if kind == "linear":
        return (b32 @ a32) * scale  # (d, k)
    if kind == "conv1d":
        return (b32 @ a32).t() * scale  # (k, d): Conv1D stores Wᵀ
    if kind == "embedding":
        return (b32 @ a32).t() * scale  # (V, d): a row per token
    if kind == "conv2d":
        if a32.shape[-2:] == (1, 1):
            return (b32.flatten(1) @ a32.flatten(1))[:, :, None, None] * scale
        # B is 1×1, so ΔW[o, i, y, x] = Σ_r B[o, r]·A[r, i, y, x].
        return torch.einsum("or,rikl->oikl", b32.flatten(1), a32) * scale
    raise ValueError(f"unknown LoRA layer kind {kind!r}")
