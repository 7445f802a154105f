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
    """One layer's stacked factors. at: (S, k, r) (linear) or (S, V, r) (embedding); bt: (S, r, d).

    ``acat`` (k, m·r) / ``bcat`` (m·r, d): the factors of the bank's resident slots ``key`` (m of
    them, in that order) side by side, built on first use by a mixed decode step and kept while the
    batch's adapters stay among them."""

    def __init__(self, at: torch.Tensor, bt: torch.Tensor) -> None:
        self.at, self.bt = at, bt
        self.key: tuple[int, ...] = ()
        self.acat: torch.Tensor | None = None
        self.bcat: torch.Tensor | None = None

    def resident(self, key: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.key != key or self.acat is None or self.bcat is None:
            sel = torch.tensor(key, dtype=torch.long, device=self.at.device)
            s, k, r = self.at.shape
            self.acat = self.at.index_select(0, sel).permute(1, 0, 2).reshape(k, len(key) * r)
            self.bcat = self.bt.index_select(0, sel).reshape(len(key) * r, self.bt.shape[-1])
            self.key = key
        return self.acat, self.bcat


class _Routing:
    """One forward's routing, computed once in ``route`` and shared by every layer.

    idx (N,) slot of each row; uniform: the slot when all rows share one; key: the resident slots
    (a superset of the rows' adapters) whose factors the masked GEMMs read, in block order."""

    def __init__(self, idx: torch.Tensor, slots: list[int], key: tuple[int, ...]) -> None:
        self.idx = idx
        self.slots = slots
        self.uniform = slots[0] if len(set(slots)) == 1 else None
        self.key = key
        self._masks: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def mask(self, r: int, dtype: torch.dtype) -> torch.Tensor:
        """(N, m·r): ones on row i's block (its slot's position in ``key``), zeros elsewhere (base rows: all)."""
        m = self._masks.get((r, dtype))
        if m is None:
            pos = {s: p for p, s in enumerate(self.key)}
            m = torch.zeros(len(self.slots), len(self.key) * r, dtype=dtype, device=self.idx.device)
            for i, s in enumerate(self.slots):
                if s in pos:
                    m[i, pos[s] * r : (pos[s] + 1) * r] = 1
            self._masks[(r, dtype)] = m
        return m


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
        self._rt: _Routing | None = None  # the routing of the forward calls under way
        self._key: tuple[int, ...] = ()  # the resident slots (see _Stack.resident)
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
        self._key = ()
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
        present = sorted({s for s in slots if s})
        # Keep the resident slots while they hold every adapter of this batch and few others
        # (rows leaving a decode batch then cost nothing); else make exactly this batch's resident.
        if not (set(present) <= set(self._key) and len(self._key) <= len(present) + _SPARE_BLOCKS):
            self._key = tuple(present)
        device = next(iter(self._stacks.values())).at.device if self._stacks else torch.device("cpu")
        self._rt = _Routing(torch.tensor(slots, dtype=torch.long, device=device), slots, self._key)
        try:
            yield
        finally:
            self._rt = None

    def _make_hook(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            rt = self._rt
            if rt is None or rt.uniform == 0 or not args:
                return None
            return self._apply(self._stacks[path], module, args[0], out, rt)

        return hook

    @staticmethod
    def _apply(stack: _Stack, layer: nn.Module, x: torch.Tensor, out: torch.Tensor, rt: _Routing) -> torch.Tensor:
        """out + s·(x Aᵀ_row) Bᵀ_row for every row. x (N, T, k) (token ids for embeddings), out (N, T, d)."""
        n = x.shape[0]
        if n != rt.idx.shape[0]:
            raise ValueError(f"adapter routing got {rt.idx.shape[0]} names for a batch of {n} rows")
        at, bt = stack.at, stack.bt  # the compute dtype (fp32 on CPU); ``out`` keeps its own
        r = bt.shape[1]
        embedding = getattr(layer, "kind", "") == "embedding"
        t = x[0].numel() if embedding else x[0].numel() // x.shape[-1]  # tokens per row
        if rt.uniform is not None:  # one adapter for every row: two plain GEMMs
            s = rt.uniform
            xa = nn.functional.embedding(x, at[s]) if embedding else x.reshape(-1, x.shape[-1]).to(at.dtype) @ at[s]
            return _add_product(out, xa.reshape(-1, r), bt[s])
        if embedding:
            # Each token's row of its row's Aᵀ (no copy of the (V, r) tables): (N, T, r).
            xa = at[rt.idx[:, None], x.reshape(n, -1)]
            return _add_product(out, xa, bt.index_select(0, rt.idx))
        if t * len(rt.key) <= _MASKED_MAX:
            # Few tokens per row (decode): the resident adapters' factors side by side, two dense
            # GEMMs and a mask keeping each row's own r columns — reads each adapter present once,
            # copies nothing per step (SGMV's effect in dense ops). h (N·T, m·r).
            acat, bcat = stack.resident(rt.key)
            h = x.reshape(-1, x.shape[-1]).to(acat.dtype) @ acat
            h.view(n, t, -1).mul_(rt.mask(r, h.dtype)[:, None, :])
            return _add_product(out, h, bcat)
        # Many tokens per row (prefill): gather each row's factors, (N, k, r) and (N, r, d) (BGMV);
        # the copy is small next to T tokens of work, and the FLOPs are each row's own.
        xa = torch.bmm(x.reshape(n, t, -1).to(at.dtype), at.index_select(0, rt.idx))  # (N, T, r)
        return _add_product(out, xa, bt.index_select(0, rt.idx))


# Masked dense GEMMs over the m resident adapters cost N·T·m·r·(k+d) multiply-adds, m times a
# row's own; below this many (tokens per row × resident adapters) they beat gathering the rows'
# factors (decode: T = 1, m ≤ batch size), above it (prefill) the gather wins.
_MASKED_MAX = 64
# Resident adapters beyond the batch's own that a decode step still reads rather than re-gather.
_SPARE_BLOCKS = 4


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out + a @ b (a (M, r) / b (r, d), or batched (N, T, r) / (N, r, d)), in place when allowed.

    The product is cast to ``out``'s dtype before the add: an in-place add of an fp32 tensor to a
    bf16 one takes a slow mixed-dtype path (1 ms vs 0.25 ms for 512 × 1536 on one core)."""
    batched = b.dim() == 3
    shape = (a.shape[0], -1, out.shape[-1]) if batched else (-1, out.shape[-1])
    o = out.view(shape) if out.is_contiguous() else out.reshape(shape)
    inplace = out.is_contiguous() and not (torch.is_grad_enabled() and out.requires_grad)
    if inplace and a.dtype == out.dtype:
        (o.baddbmm_ if batched else o.addmm_)(a.reshape(o.shape[:-1] + (-1,)), b)
        return out
    prod = (torch.bmm if batched else torch.mm)(a.reshape(o.shape[:-1] + (-1,)), b).to(out.dtype)
    if inplace:
        o.add_(prod)
        return out
    return (o + prod).view(out.shape)
