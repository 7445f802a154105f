"""Many LoRA adapters in one batch: each row through its own adapter with one gathered product.

``adapter_per_sample`` (inject.py) runs an ``index_select`` / ``index_add`` pair per adapter present
in the batch, so a batch mixing n adapters pays n small launches per layer (measured ~40 % slower
than one adapter at n = 4 on SmolLM2-135M, one core). Punica's BGMV / S-LoRA instead stack every
adapter's factors once and *gather* each row's pair, so the cost of a mixed batch does not grow
with the number of distinct adapters:

    Aᵀ_stack (S, k, r_max)    Bᵀ_stack (S, r_max, d) with the scale s folded in; slot 0 = zeros (the base)
    y += bmm(bmm(x, Aᵀ_stack[idx]), Bᵀ_stack[idx])        x (N, T, k), idx (N,) row → slot

Adapters of different rank are zero-padded to r_max (exact: the padded columns multiply zeros).
A layer that an adapter does not adapt holds zeros in that adapter's slot. A batch whose rows all
use one slot takes the ordinary two-GEMM path (no gather).

This is an inference path: the stacks are detached copies of the adapters' factors (rebuilt by
:meth:`AdapterBank.rebuild` after adapters are added or removed), and the model's own LoRA routing
is switched off while the bank is installed (every layer's ``active`` list is emptied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .lora import LoraLayer

__all__ = ["AdapterBank", "servable_problem"]


def servable_problem(config: Any) -> str | None:
    """Why an adapter config cannot be served by the bank (None when it can)."""
    kind = type(config).__name__
    if kind != "LoraConfig":
        return f"it is a {kind} adapter; only LoRA adapters (incl. rsLoRA, per-module ranks) are served per row"
    if getattr(config, "use_dora", False):
        return "it is a DoRA adapter (its magnitude rescales the whole weight, not a low-rank sum)"
    if getattr(config, "modules_to_save", None):
        return f"it trains full copies of {list(config.modules_to_save)} (modules_to_save)"
    if getattr(config, "bias", "none") != "none":
        return f"it trains biases (bias={config.bias!r}), which change the base for every row"
    return None


class _Stack:
    """One layer's stacked factors. at: (S, k, r) (linear) or (S, V, r) (embedding); bt: (S, r, d)."""

    def __init__(self, at: torch.Tensor, bt: torch.Tensor) -> None:
        self.at, self.bt = at, bt


class AdapterBank:
    """Stacked factors of every LoRA adapter of ``model``, installed as forward hooks on its layers.

    ``with bank.route(names):`` makes the next forward calls send row i through adapter
    ``names[i]`` (None = the base model). Outside ``route`` the layers compute the base model.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slots: dict[str, int] = {}
        self._stacks: dict[str, _Stack] = {}
        self._hooks: list[RemovableHandle] = []
        self._idx: torch.Tensor | None = None  # (N,) slot of each row of the current batch
        self._uniform: int | None = None  # the slot when every row uses the same one
        self.rebuild()

    # ------------------------------------------------------------------ building
    def rebuild(self) -> None:
        """Re-read every adapter's factors from the model (after an adapter was added or removed)."""
        from ..inject import lora_layers

        state = getattr(self.model, "deltatune_state", None)
        configs: dict[str, Any] = dict(getattr(state, "configs", {}) or {})
        for name, cfg in configs.items():
            problem = servable_problem(cfg)
            if problem is not None:
                raise ValueError(f"adapter {name!r} cannot be served per row: {problem}")
        names = sorted(configs)
        self.close()
        self.slots = {n: i + 1 for i, n in enumerate(names)}
        self._stacks = {}
        for path, layer in lora_layers(self.model):
            if layer.merged:
                raise ValueError(f"{path}: adapters {layer.merged} are merged; unmerge before serving per row")
            if layer.kind not in ("linear", "conv1d", "embedding"):
                raise ValueError(f"{path}: LoRA on a {layer.kind} layer cannot be served per row")
            self._stacks[path] = self._stack(layer, names)
        self.install()

    def install(self) -> None:
        """(Re-)attach the routing hooks to the stacked layers and switch the layers' own LoRA off."""
        from ..inject import lora_layers

        self.close()
        for path, layer in lora_layers(self.model):
            if path in self._stacks:
                layer.active = []  # the bank does the routing; the layer computes only its base
                self._hooks.append(layer.register_forward_hook(self._make_hook(path)))
        state = getattr(self.model, "deltatune_state", None)
        if state is not None:
            state.active = []

    @staticmethod
    def _stack(layer: LoraLayer, names: list[str]) -> _Stack:
        k, d = layer.in_features, layer.out_features
        present = [n for n in names if n in layer.adapters]
        r_max = max((layer.adapters[n].r for n in present), default=1)
        w = layer.base_weight()
        # On CPU the low-rank products run in fp32 whatever the base dtype: these GEMMs are tiny
        # (N×k×r), and bf16 ones were 2x slower than fp32 here (16×576 @ 576×8 then 8×1536:
        # 70 µs vs 37 µs, one thread, AMX machine). On GPUs the factors take the base dtype.
        dtype = w.dtype if (w.is_floating_point() and w.device.type != "cpu") else torch.float32
        at = torch.zeros(len(names) + 1, k, r_max, dtype=torch.float32, device=w.device)
        bt = torch.zeros(len(names) + 1, r_max, d, dtype=torch.float32, device=w.device)
        for slot, n in enumerate(names, start=1):
            if n not in layer.adapters:
                continue
            a, b = layer.factors(n)  # (r, k), (d, r) as stored (conv1d too: LoRA's A/B are linear)
            r = layer.adapters[n].r
            at[slot, :, :r] = a.detach().float().t()
            bt[slot, :r, :] = b.detach().float().t() * layer.adapters[n].scale
        return _Stack(at.to(dtype), bt.to(dtype))

    def close(self) -> None:
        """Remove the hooks (the model computes its base, adapters inactive, until set_active)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ routing
    @contextlib.contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[None]:
        """Row i of the next forward calls goes through adapter ``names[i]`` (None: the base)."""
        unknown = sorted({n for n in names if n is not None and n not in self.slots})
        if unknown:
            raise ValueError(f"no adapter named {unknown}; the bank holds {sorted(self.slots)}")
        slots = [0 if n is None else self.slots[n] for n in names]
        device = next(iter(self._stacks.values())).at.device if self._stacks else torch.device("cpu")
        self._idx = torch.tensor(slots, dtype=torch.long, device=device)
        self._uniform = slots[0] if len(set(slots)) == 1 else None
        try:
            yield
        finally:
            self._idx, self._uniform = None, None

    def _make_hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            if self._idx is None or self._uniform == 0 or not args:
                return None
            return self._apply(self._stacks[path], module, args[0], out)

        return hook

    def _apply(self, stack: _Stack, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + s·(x Aᵀ_row) Bᵀ_row for every row. x (N, T, k) (token ids for embeddings), out (N, T, d)."""
        idx = self._idx
        assert idx is not None
        if x.shape[0] != idx.shape[0]:
            raise ValueError(f"adapter routing got {idx.shape[0]} names for a batch of {x.shape[0]} rows")
        at, bt = stack.at, stack.bt  # the compute dtype (fp32 on CPU); ``out`` keeps its own
        same = out.dtype == at.dtype
        embedding = getattr(layer, "kind", "") == "embedding"
        # In place on the base output (a fresh tensor) unless autograd is recording.
        inplace = out.is_contiguous() and not (torch.is_grad_enabled() and out.requires_grad)
        if self._uniform is not None:  # one adapter for every row: two plain GEMMs
            s = self._uniform
            if embedding:
                xa = nn.functional.embedding(x, at[s])  # (N, T, r)
            else:
                xa = x.reshape(-1, x.shape[-1]).to(at.dtype) @ at[s]  # (N·T, r)
            xa2 = xa.reshape(-1, xa.shape[-1])
            out2 = out.view(-1, out.shape[-1]) if out.is_contiguous() else out.reshape(-1, out.shape[-1])
            if inplace:
                if same:
                    out2.addmm_(xa2, bt[s])
                else:
                    out2.add_(xa2 @ bt[s])
                return out
            return (out2 + (xa2 @ bt[s]).to(out.dtype)).view(out.shape)
        # Mixed batch: gather each row's factors (BGMV): (N, k, r) and (N, r, d).
        a_rows, b_rows = at.index_select(0, idx), bt.index_select(0, idx)
        n = x.shape[0]
        if embedding:
            # Row lookup of each token in its row's Aᵀ: (N, T, r).
            rows = torch.arange(n, device=x.device)[:, None].expand_as(x)
            xa = a_rows[rows, x]
        else:
            xa = torch.bmm(x.reshape(n, -1, x.shape[-1]).to(at.dtype), a_rows)  # (N, T, r)
        xa = xa.reshape(n, -1, xa.shape[-1])
        out3 = out.view(n, -1, out.shape[-1]) if out.is_contiguous() else out.reshape(n, -1, out.shape[-1])
        if inplace:
            if same:
                out3.baddbmm_(xa, b_rows)
            else:
                out3.add_(torch.bmm(xa, b_rows))
            return out
        return (out3 + torch.bmm(xa, b_rows).to(out.dtype)).view(out.shape)
