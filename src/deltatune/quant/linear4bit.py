"""A frozen 4-bit linear layer (QLoRA base weight) and whole-model quantization.

QLoRA (Dettmers et al. 2023, §3, eq. 5): Y = X · dequant(W_NF4) in the compute dtype.  The
dequantized weight exists only inside one forward (and again inside one backward): autograd
saves the packed uint8 codes, never a dequantized copy, and only the input receives a gradient.

State-dict layout is the bitsandbytes/transformers one, so a ``load_in_4bit`` checkpoint loads
here and ours loads there::

    <name>.weight                                     (ceil(out*in/2), 1) uint8 packed codes
    <name>.bias                                       (out,) if present
    <name>.weight.absmax / .quant_map / .nested_absmax / .nested_quant_map
    <name>.weight.quant_state.bitsandbytes__nf4       uint8 JSON (shape, dtype, block sizes, offset)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .nf4 import (
    NESTED_BLOCK_SIZE,
    VALID_BLOCK_SIZES,
    QuantState4bit,
    create_dynamic_map,
    dequantize_4bit,
    get_4bit_code,
    quantize_4bit,
)

__all__ = ["Linear4bit", "quantize_model", "quantize_base", "model_storage_report"]


class _Dequant4bitLinear(torch.autograd.Function):
    """y = x @ dequant(packed)^T with a backward that re-dequantizes.

    forward(x: (..., in) compute dtype, packed: (ceil(out*in/2), 1) uint8) -> (..., out).
    Saved for backward: ``packed`` only; the state's small tensors ride on ``ctx`` (they are
    owned by the module anyway).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, packed: Tensor, state: QuantState4bit) -> Tensor:
        w = dequantize_4bit(packed, state, x.dtype)  # (out, in), freed on return
        ctx.state = state
        ctx.save_for_backward(packed)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, None]:
        (packed,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        w = dequantize_4bit(packed, ctx.state, grad_out.dtype)  # (out, in)
        return grad_out @ w, None, None  # (..., out) @ (out, in) -> (..., in)


class Linear4bit(nn.Module):
    """Frozen linear layer whose weight is stored as packed 4-bit codes plus a QuantState4bit.

    ``weight`` is a frozen uint8 ``nn.Parameter`` of packed codes (like bitsandbytes'
    Params4bit, so ``named_parameters`` and ``.to(device)`` see it; ``.to(dtype)`` leaves
    integer tensors alone).  ``bias`` stays in its original dtype and is frozen.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        # Placeholder storage (all codes 0, all scales 0) of the right shapes, filled by
        # load_state_dict; cheap even for large layers (no quantization pass).
        if block_size not in VALID_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {VALID_BLOCK_SIZES}, got {block_size}")
        n = out_features * in_features
        n_blocks = -(-n // block_size)
        packed = torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device)
        code = get_4bit_code(quant_type).to(device)
        state = QuantState4bit(
            absmax=torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device),
            shape=torch.Size((out_features, in_features)),
            dtype=dtype,
            block_size=block_size,
            quant_type=quant_type,
            code=code.clone(),
        )
        if double_quant:
            state.nested_absmax = torch.zeros(-(-n_blocks // NESTED_BLOCK_SIZE), device=device)
            state.nested_code = create_dynamic_map(True).to(device).clone()
            state.offset = torch.zeros((), device=device)
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.quant_state = state
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_size: int = 64,
        double_quant: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> Linear4bit:
        """Quantize ``linear.weight`` (out, in); the bias is kept as is (frozen)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features = linear.in_features
        layer.out_features = linear.out_features
        layer.compute_dtype = compute_dtype
        packed, state = quantize_4bit(linear.weight.detach(), block_size, double_quant, quant_type)
        layer.weight = nn.Parameter(packed, requires_grad=False)
        layer.quant_state = state
        layer.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        return layer

    # LoRA wraps this layer like an nn.Linear (deltatune.methods.lora.supported_base).
    is_deltatune_linear = True

    @torch.no_grad()
    def requantize_(self, weight: Tensor) -> None:
        """Replace the stored weight by the NF4/FP4 quantization of ``weight`` (out, in), keeping
        this layer's block size, double quantization and original dtype (merging into 4 bits)."""
        s = self.quant_state
        packed, state = quantize_4bit(weight.to(s.dtype), s.block_size, s.nested, s.quant_type)
        self.weight.data = packed
        self.quant_state = state

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """(out, in) weight in ``dtype`` (default: the dtype it was quantized from)."""
        return dequantize_4bit(self.weight, self.quant_state, dtype).view(self.out_features, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        # As bitsandbytes' Linear4bit: compute in compute_dtype, return in the input dtype.
        in_dtype = x.dtype
        y = _Dequant4bitLinear.apply(x.to(self.compute_dtype), self.weight, self.quant_state)
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        s = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={s.quant_type}, block_size={s.block_size}, double_quant={s.nested}, "
            f"compute_dtype={self.compute_dtype}"
        )

    # -- device moves: the state's tensors follow the packed weight, never a dtype cast --------
    def _apply(self, fn: Any, recurse: bool = True) -> Linear4bit:
        super()._apply(fn, recurse)
        if self.quant_state.absmax.device != self.weight.device:
            self.quant_state = self.quant_state.to(self.weight.device)
        return self

    # -- state dict in the bitsandbytes/transformers layout -----------------------------------
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for key, val in self.quant_state.state_dict().items():
            destination[prefix + "weight." + key] = val if keep_vars else val.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        wkey = prefix + "weight"
        qs = {k: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        if qs:
            try:
                state = QuantState4bit.from_state_dict(qs, device=self.weight.device)
            except (KeyError, ValueError) as err:
                error_msgs.append(f"{wkey}: bad 4-bit quant state ({err})")
                return
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{wkey}: quantized shape {tuple(state.shape)} != ({self.out_features}, {self.in_features})"
                )
                return
            self.quant_state = state
            if wkey in state_dict:  # take the packed tensor's shape/dtype as stored
                packed = state_dict[wkey]
                self.weight = nn.Parameter(
                    torch.empty_like(packed, device=self.weight.device), requires_grad=False
                )
        elif wkey in state_dict and state_dict[wkey].is_floating_point():
            # A 16/32-bit checkpoint (out, in): quantize it with this layer's settings.
            w = state_dict[wkey]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{wkey}: shape {tuple(w.shape)} != ({self.out_features}, {self.in_features})"
                )
                return
            cur = self.quant_state
            packed, self.quant_state = quantize_4bit(
                w.to(self.weight.device), cur.block_size, cur.nested, cur.quant_type
            )
            self.weight = nn.Parameter(packed, requires_grad=False)
            state_dict = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict[wkey] = packed
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # nn.Module flags "weight.<x>" keys as unexpected (no submodule named weight); we used them.
        unexpected_keys[:] = [k for k in unexpected_keys if k not in qs]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def quantize_model(
    model: nn.Module,
    block_size: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.bfloat16,
    skip_modules: Iterable[str] = ("lm_head",),
    quant_type: str = "nf4",
) -> nn.Module:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`Linear4bit`, in place.

    Modules named in ``skip_modules`` (exact name or dotted suffix) stay as they are; so do
    embeddings and anything that is not exactly an ``nn.Linear`` (e.g. an already adapted
    layer).  Returns ``model``.
    """
    skip = tuple(skip_modules)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not _matches(name, skip)
    ]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = Linear4bit.from_linear(mod, block_size, double_quant, quant_type, compute_dtype)
        setattr(parent, child, q)
    return model


def quantize_base(model: nn.Module, quant_type: str = "nf4") -> nn.Module:
    """The frozen base of a training run to 4 bits (double-quantized, blocks of 64), in place.

    Embeddings and the output head keep their dtype. Compute runs in the dtype the model was loaded
    in (bf16 where the hardware has it: bf16 matmuls on a CPU without AVX512-BF16 are far slower than
    fp32)."""
    compute = next(model.parameters()).dtype
    quantize_model(model, compute_dtype=compute if compute.is_floating_point else torch.float32,
                   quant_type=quant_type)
    # transformers loads weights as views of the checkpoint's mmap; the kept embedding/norms would
    # hold the whole mapping, with every page quantize_model read, resident (measured: +300 MiB RSS
    # on SmolLM2-135M). Own copies release it.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()
    return model


def model_storage_report(model: nn.Module) -> dict[str, int]:
    """Bytes held by ``model`` by storage type.

    Keys: ``"<quant_type>_packed"`` (4-bit codes), ``"quant_stats"`` (absmax, nested absmax,
    offset, code tables), one key per dtype of the remaining parameters and buffers (e.g.
    ``"bfloat16"``, ``"float32"``), ``"params_4bit"`` (number of weights stored in 4 bits) and
    ``"total"`` (bytes).  Shared tensors are counted once.
    """
    report: dict[str, int] = {}
    seen: set[int] = set()

    def add(key: str, t: Tensor | None) -> None:
        if t is None:
            return
        ident = id(t)
        if ident in seen:
            return
        seen.add(ident)
        report[key] = report.get(key, 0) + t.numel() * t.element_size()

    packed_ids: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, Linear4bit):
            s = mod.quant_state
            add(f"{s.quant_type}_packed", mod.weight)
            packed_ids.add(id(mod.weight))
            for t in (s.absmax, s.code, s.nested_absmax, s.nested_code, s.offset):
                add("quant_stats", t)
            report["params_4bit"] = report.get("params_4bit", 0) + s.numel
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in packed_ids:
            add(str(t.dtype).removeprefix("torch."), t)
    report["total"] = sum(v for k, v in report.items() if k != "params_4bit")
    return report
