"""AdaLoRA — adaptive budget allocation in SVD form (Zhang et al. 2023; MISSION §6).

    h = W₀x + s·P Λ Q·drop(x),   s = alpha / ranknum   (PEFT: scaling / (ranknum + 1e-5))

Per adapted layer (k = in, d = out, r = init_r), with PEFT's names:
  lora_A = Q (r, k)   right singular vectors      init N(0, 0.02²)
  lora_E = Λ (r, 1)   singular values              init 0, so ΔW = 0 at the start
  lora_B = P (d, r)   left singular vectors        init N(0, 0.02²)
  ranknum (1,)        init_r, frozen: the scale stays alpha/init_r even after pruning

Training (paper §3.2–3.3, PEFT's ``RankAllocator`` step for step):
* sensitivity of every entry, I = |w · ∂L/∂w|, smoothed Ī ← β₁Ī + (1−β₁)I, uncertainty
  Ū ← β₂Ū + (1−β₂)|I − Ī|, score s = Ī·Ū (Eq. 8–10); triplet i scores s(λᵢ) + mean_j s(Q_ij) +
  mean_j s(P_ji) (Eq. 7, with means as in PEFT);
* a budget b(t) = init_bgt for t ≤ tinit, then b(t) = ⌊(init_bgt − target_bgt)(1 − (t−tinit)/(T−tfinal−tinit))³
  + target_bgt⌋ (Eq. 11), target_bgt = target_r × #layers; every delta_t steps the λᵢ whose score
  is ≤ the (init_bgt − b)-th smallest over *all* layers are zeroed, so rank flows to the layers
  that need it; at t = T − tfinal the final pattern is fixed and re-applied after every later step;
* an orthogonality regulariser on P and Q (paper Eq. 4; PEFT's form by default, see
  :func:`orth_regulariser`).
Both reach the training loop as hooks (``deltatune.train.hooks``), made by :func:`adalora_hooks`:
the allocator (:class:`RankAllocator`, ``after_step``) and the regulariser (:class:`OrthRegulariser`,
``extra_loss``); the run length T arrives as ``RunInfo.total_steps`` unless ``adalora.total_step`` is set.

Files: PEFT's layout (``base_model.model.<path>.lora_A`` …, no ranknum) with ``rank_pattern`` in
adapter_config.json and the masked triplets cut out of the tensors, as PEFT saves them.
Supported base layers: nn.Linear and GPT-2 Conv1D.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .lora import base_shape, supported_base, weight_of
from .single import SingleAdapterLayer, unload_layers

if TYPE_CHECKING:
    from ..io import AdapterFile
    from ..train.hooks import Hook, RunInfo

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "RankAllocator", "OrthRegulariser", "inject_adalora", "adalora_layers",
           "adalora_hooks", "apply",
           "orth_regulariser", "delta_weight", "merge", "unmerge", "unload", "save_peft", "load_peft"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class AdaLoraConfig:
    """ΔW = P Λ Q per layer, rank pruned from init_r to an average target_r by triplet importance."""

    PEFT_TYPE: ClassVar[str] = "ADALORA"

    init_r: int = field(default=12, metadata=_doc("Initial rank of every adapted layer (PEFT init_r)."))
    target_r: int = field(default=8, metadata=_doc("Average rank per layer after pruning (PEFT target_r)."))
    alpha: float = field(default=8.0, metadata=_doc("Scale numerator: s = alpha/init_r (PEFT lora_alpha)."))
    dropout: float = field(default=0.0, metadata=_doc("Dropout on the adapter input only."))
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_doc("Modules to adapt (nn.Linear or Conv1D): exact names or dotted suffixes, a regex, "
                      "or 'all-linear'."))
    exclude_modules: list[str] | str | None = field(
        default=None, metadata=_doc("Names/suffixes (list) or a regex (string) never adapted."))
    layers_to_transform: list[int] | None = field(default=None, metadata=_doc("Only adapt these block indices."))
    tinit: int = field(default=0, metadata=_doc("Warm-up steps at the full budget before pruning starts."))
    tfinal: int = field(default=0, metadata=_doc("Final steps at the fixed, pruned rank pattern."))
    delta_t: int = field(default=1, metadata=_doc("Re-allocate the budget every delta_t steps (PEFT deltaT)."))
    beta1: float = field(default=0.85, metadata=_doc("EMA factor of the sensitivity (paper β₁)."))
    beta2: float = field(default=0.85, metadata=_doc("EMA factor of the uncertainty (paper β₂)."))
    orth_reg_weight: float = field(default=0.5, metadata=_doc("Weight γ of the orthogonality regulariser."))
    orth_reg: Literal["peft", "paper"] = field(default="peft", metadata=_doc(
        "Regulariser form: 'peft' = mean over the P and Q matrices of ‖PᵀP−I‖_F, ‖QQᵀ−I‖_F (PEFT and the "
        "authors' code); 'paper' = Σ over layers of ‖PᵀP−I‖²_F + ‖QQᵀ−I‖²_F (paper Eq. 4)."))
    total_step: int | None = field(default=None, metadata=_doc(
        "Optimizer steps of the run, T in the budget schedule; null = train.max_steps."))

    def __post_init__(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"adalora.{msg}")

        from deltatune.validate import number

        check(self.init_r > 0, f"init_r must be a positive integer, got {self.init_r!r}")
        number("adalora.alpha", self.alpha, gt=0, hint="s = alpha/init_r scales the update; 0 would train nothing")
        check(0 <= self.target_r <= self.init_r, f"target_r must be in [0, init_r={self.init_r}], got {self.target_r!r}")
        check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        check(0.0 < self.beta1 < 1.0 and 0.0 < self.beta2 < 1.0, f"beta1/beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        check(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        check(self.orth_reg in ("peft", "paper"), f"orth_reg must be 'peft' or 'paper', got {self.orth_reg!r}")
        check(self.tinit >= 0 and self.tfinal >= 0, f"tinit/tfinal must be >= 0, got {self.tinit}, {self.tfinal}")
        check(self.delta_t >= 1, f"delta_t must be >= 1, got {self.delta_t}")
        check(self.total_step is None or self.total_step > 0, f"total_step must be > 0 or null, got {self.total_step}")
        check(self.total_step is None or self.tinit < self.total_step - self.tfinal,
              f"tinit={self.tinit} must be < total_step - tfinal = {self.total_step} - {self.tfinal} "
              "(no step would be left for pruning)")
        if isinstance(self.target_modules, list | tuple) and not self.target_modules:
            raise ValueError("adalora.target_modules is empty: name at least one module, a regex, or 'all-linear'")


# ------------------------------------------------------------------------------------ layer
def delta_weight(kind: str, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor, scale: float) -> torch.Tensor:
    """s·P Λ Q in the base weight's layout, in fp32 (pure function; used by merge).
    a = Q (r, k), b = P (d, r), e = Λ (r, 1)."""
    dw = (b.detach().float() @ (a.detach().float() * e.detach().float())) * scale  # (d, k)
    return dw.t() if kind == "conv1d" else dw  # Conv1D stores Wᵀ (k, d)


class AdaLoraLayer(SingleAdapterLayer):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) plus one AdaLoRA adapter of rank ``r``."""

    method = "AdaLoRA"

    def __init__(self, base_layer: nn.Module, name: str, r: int, config: AdaLoraConfig) -> None:
        super().__init__(base_layer, name)
        k, d, fac = self.in_features, self.out_features, self.factory
        self.lora_A = nn.ParameterDict({name: nn.Parameter(torch.randn(r, k, **fac) * 0.02)})  # Q
        self.lora_B = nn.ParameterDict({name: nn.Parameter(torch.randn(d, r, **fac) * 0.02)})  # P
        self.lora_E = nn.ParameterDict({name: nn.Parameter(torch.zeros(r, 1, **fac))})  # Λ
        # ranknum = init_r whatever r is now: PEFT keeps the training-time scale after pruning.
        self.ranknum = nn.ParameterDict(
            {name: nn.Parameter(torch.full((1,), float(config.init_r), **fac), requires_grad=False)})
        self.r, self.dropout = r, config.dropout
        # PEFT: scaling = lora_alpha (or r when alpha is 0), divided by ranknum + 1e-5 in forward.
        self.scale = (config.alpha if config.alpha > 0 else float(r)) / (config.init_r + 1e-5)
        self.kept: list[bool] | None = None  # the last rank pattern (len init_r), set by the allocator or a file

    def factors(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        """(Q (r, k), P (d, r), Λ (r, 1)) as stored: lora_A, lora_B, lora_E."""
        return self.lora_A[self.name], self.lora_B[self.name], self.lora_E[self.name]

    def delta(self) -> torch.Tensor:
        a, b, e = self.factors()
        return delta_weight(self.kind, a, b, e, self.scale)

    def has_adapter(self) -> bool:
        return self.r > 0

    def add_adapter(self, out: torch.Tensor, x2: torch.Tensor, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        a, b, e = self.factors()
        if self.dropout > 0.0 and self.training:
            x2 = F.dropout(x2, self.dropout, True)
        xa = F.linear(x2, (a * e).to(dt))  # (N, r) = x·(ΛQ)ᵀ; Λ scales Q's rows
        return out.addmm_(xa.to(out.dtype), b.t().to(out.dtype), alpha=self.scale)  # += s·(ΛQx)Pᵀ, in place

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapter={self.name}, r={self.r}, scale={self.scale:.6g}, merged={self.merged}"



def orth_regulariser(layers: list[AdaLoraLayer], how: str = "peft") -> torch.Tensor:
    """R = Σ over layers of ‖PᵀP − I‖ and ‖QQᵀ − I‖ (both r × r), in fp32 even under autocast.

    'peft':  the mean of the 2L Frobenius norms (PEFT's AdaLoraModel.forward, the authors' code);
    'paper': Σ_layers ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F (paper Eq. 4)."""
    device = weight_of(layers[0].base_layer).device
    terms = []
    with torch.autocast(device.type, enabled=False):
        for layer in layers:
            a, b, _ = layer.factors()
            for cov in (a.float() @ a.float().t(), b.float().t() @ b.float()):  # QQᵀ, PᵀP: (r, r)
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                norm = torch.linalg.matrix_norm(cov - eye)  # Frobenius
                terms.append(norm if how == "peft" else norm.square())
    total = torch.stack(terms).sum()
    return total / len(terms) if how == "peft" else total


# ------------------------------------------------------------------------------------ rank allocator
class RankAllocator:
    """PEFT's ``RankAllocator`` plus ``AdaLoraModel.update_and_allocate``, with the same semantics.

    Call :meth:`step` after each optimizer step (the training loop does: the allocator is a hook and
    ``after_step`` is :meth:`step`). It reads each parameter's gradient of the step just taken:
    ``p.grad`` if it is still there, otherwise the one kept by a post-accumulate-grad hook (our loop
    calls the hook after ``zero_grad(set_to_none=True)``; the kept tensor still holds the clipped,
    fully accumulated gradient, since clipping works in place and set_to_none only drops the reference).
    """

    name = "adalora_ranks"  # the hook's checkpoint key

    def __init__(self, layers: list[tuple[str, AdaLoraLayer]], config: AdaLoraConfig, total_step: int) -> None:
        self.layers = layers
        self.config = config
        self.total_step = total_step
        self.init_bgt = sum(layer.r for _, layer in layers)
        self.target_bgt = config.target_r * len(layers)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.budget = self.init_bgt
        self.reset_ipt()
        self._grads: dict[int, torch.Tensor | None] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._keep_grad)
                         for _, layer in layers for p in layer.factors()]

    def _keep_grad(self, p: torch.Tensor) -> None:
        self._grads[id(p)] = p.grad

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset_ipt(self) -> None:
        self.ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, mask now?) for ``step``: the cubic schedule of paper Eq. 11 / PEFT."""
        c = self.config
        if step <= c.tinit:
            return self.init_bgt, False
        if step > self.total_step - c.tfinal:
            return self.target_bgt, True
        mul = 1 - (step - c.tinit) / (self.total_step - c.tfinal - c.tinit)
        return int((self.init_bgt - self.target_bgt) * (mul**3) + self.target_bgt), step % c.delta_t == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for path, layer in self.layers:
            for part, p in zip(("lora_A", "lora_B", "lora_E"), layer.factors()):
                key = (path, part)
                if key not in self.ipt:
                    self.ipt[key] = torch.zeros_like(p)
                    self.exp_avg_ipt[key] = torch.zeros_like(p)
                    self.exp_avg_unc[key] = torch.zeros_like(p)
                g = self._grads.get(id(p))
                g = p.grad if g is None else g
                self.ipt[key] = (p * g).abs().detach() if g is not None else torch.zeros_like(p)  # |w·∂L/∂w|
                self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt[key] + (1 - b1) * self.ipt[key]  # sensitivity EMA
                self.exp_avg_unc[key] = b2 * self.exp_avg_unc[key] + (1 - b2) * (self.ipt[key] - self.exp_avg_ipt[key]).abs()

    def _score(self, path: str, part: str) -> torch.Tensor:
        return self.exp_avg_ipt[(path, part)] * self.exp_avg_unc[(path, part)]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Score of each triplet (r,) per layer: s(λᵢ) + mean_j s(Q_ij) + mean_j s(P_ji)."""
        out = {}
        for path, _ in self.layers:
            s_q = self._score(path, "lora_A").mean(dim=1, keepdim=True)  # (r, 1)
            s_p = self._score(path, "lora_B").mean(dim=0).view(-1, 1)  # (r, 1)
            out[path] = self._score(path, "lora_E").view(-1) + torch.cat([s_q, s_p], dim=1).sum(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the λᵢ of the (init_bgt − budget) least important triplets over all layers."""
        scores = self.triplet_scores()
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item() if k > 0 else -float("inf")
        pattern = {}
        for path, layer in self.layers:
            drop = scores[path].view(-1, 1) <= threshold  # ties at the threshold go too, as in PEFT
            layer.lora_E[layer.name].masked_fill_(drop, 0.0)
            pattern[path] = (~drop).view(-1).tolist()
            layer.kept = pattern[path]
        return pattern

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`step` carries between steps (for resumable checkpoints)."""
        tensors = {f"{kind}.{path}.{part}": t for kind, store in
                   (("ipt", self.ipt), ("avg", self.exp_avg_ipt), ("unc", self.exp_avg_unc))
                   for (path, part), t in store.items()}
        return {"tensors": tensors, "rank_pattern": self.rank_pattern, "budget": self.budget}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset_ipt()
        stores = {"ipt": self.ipt, "avg": self.exp_avg_ipt, "unc": self.exp_avg_unc}
        for key, t in state["tensors"].items():
            kind, rest = key.split(".", 1)
            path, part = rest.rsplit(".", 1)
            stores[kind][(path, part)] = t
        self.rank_pattern, self.budget = state["rank_pattern"], int(state["budget"])
        for path, layer in self.layers:
            layer.kept = self.rank_pattern[path] if self.rank_pattern else None

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        assert self.rank_pattern is not None
        for path, layer in self.layers:
            keep = torch.tensor(self.rank_pattern[path], device=layer.lora_E[layer.name].device).view(-1, 1)
            layer.lora_E[layer.name].masked_fill_(~keep, 0.0)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def after_step(self, step: int) -> None:
        self.step(step)

    def step(self, step: int) -> None:
        """After optimizer step ``step`` (0-based): update the scores and prune to the budget."""
        final = self.total_step - self.config.tfinal
        if step < final:
            self.update_ipt()
            self.budget, mask = self.budget_schedule(step)
            if mask:
                self.rank_pattern = self.mask_to_budget(self.budget)
        elif step == final:  # fix the final pattern at the target budget
            self.budget, _ = self.budget_schedule(step)
            self.rank_pattern = self.mask_to_budget(self.budget)
            self.reset_ipt()
        elif self.rank_pattern is not None:
            self.mask_using_rank_pattern()
        self._grads.clear()


class OrthRegulariser:
    """The orthogonality penalty γ·R(P, Q) as a hook (``extra_loss``); stateless."""

    name = "adalora_orth"

    def __init__(self, layers: list[AdaLoraLayer], how: str, weight: float) -> None:
        self.layers, self.how, self.weight = layers, how, weight

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        return self.weight * orth_regulariser(self.layers, self.how)

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------ model level
def adalora_layers(model: nn.Module) -> list[tuple[str, AdaLoraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdaLoraLayer)]


def _targets(model: nn.Module, config: AdaLoraConfig) -> list[str]:
    from ..inject import find_targets
    from .lora_config import LoraConfig

    # Target matching is shared with LoRA (names, suffixes, regex, 'all-linear', layer subsets).
    spec = LoraConfig(target_modules=config.target_modules, exclude_modules=config.exclude_modules,
                      layers_to_transform=config.layers_to_transform)
    paths = find_targets(model, spec)
    for path in paths:
        module = model.get_submodule(path)
        if supported_base(module) not in ("linear", "conv1d"):
            raise TypeError(f"target module {path!r} is a {type(module).__name__}; AdaLoRA supports nn.Linear and Conv1D")
    return paths


def inject_adalora(model: nn.Module, config: AdaLoraConfig, name: str = "default", *, total_step: int | None = None,
                   ranks: dict[str, int] | None = None) -> nn.Module:
    """Add AdaLoRA adapter ``name`` to ``model`` in place; only lora_A/B/E stay trainable.

    ``total_step`` (T of the rank schedule) overrides ``config.total_step`` and is stored with the
    adapter's config; :func:`adalora_hooks` needs one of them to train. ``ranks`` gives per-path ranks
    (a pruned file); default init_r everywhere."""
    from ..inject import AdapterState, _set_module

    state = getattr(model, "deltatune_state", None)
    if isinstance(state, AdapterState) and state.configs:
        raise ValueError(f"this model already has deltatune adapters {sorted(state.configs)}; AdaLoRA is added to "
                         "a model without adapters (one AdaLoRA adapter per model, as in PEFT)")
    total = total_step if total_step is not None else config.total_step
    config = dataclasses.replace(config, total_step=total)  # validates tinit < total_step − tfinal
    paths = _targets(model, config)
    for path in paths:
        r = (ranks or {}).get(path, config.init_r)
        _set_module(model, path, AdaLoraLayer(model.get_submodule(path), name, r, config))
    model.deltatune_state = AdapterState(configs={name: config}, active=[name])  # type: ignore[assignment]
    model.requires_grad_(False)
    for _, layer in adalora_layers(model):
        for p in layer.factors():
            p.requires_grad_(True)
    return model


def adalora_hooks(model: nn.Module) -> list[RankAllocator | OrthRegulariser]:
    """The training hooks of ``model``'s AdaLoRA adapter: the rank allocator (call ``after_step(step)``
    after every optimizer step) and, when ``orth_reg_weight`` > 0, the regulariser (add
    ``extra_loss(model)`` to the loss once per step). Needs the schedule's T (``total_step``)."""
    layers = adalora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no AdaLoRA layers (inject_adalora first)")
    state: Any = getattr(model, "deltatune_state", None)
    config = next(c for c in state.configs.values() if isinstance(c, AdaLoraConfig))
    if config.total_step is None:
        raise ValueError("AdaLoRA's rank schedule needs the run's number of optimizer steps: set "
                         "adalora.total_step (or train.max_steps), or pass total_step to inject_adalora")
    hooks: list[RankAllocator | OrthRegulariser] = [RankAllocator(layers, config, config.total_step)]
    if config.orth_reg_weight > 0:
        hooks.append(OrthRegulariser([layer for _, layer in layers], config.orth_reg, config.orth_reg_weight))
    return hooks


def apply(model: nn.Module, cfg: Any, info: RunInfo) -> list[Hook]:
    """``deltatune train --set method=adalora``: T is adalora.total_step, else the run's length."""
    inject_adalora(model, cfg.adalora, total_step=cfg.adalora.total_step or info.total_steps)
    return list(adalora_hooks(model))


def merge(model: nn.Module) -> nn.Module:
    """W ← W₀ + s·PΛQ in every AdaLoRA layer (pruned triplets have λ = 0); undone by :func:`unmerge`."""
    for _, layer in adalora_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in adalora_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_adapter: bool = True) -> nn.Module:
    """Remove the AdaLoRA layers (merging first unless ``merge_adapter=False``)."""
    unload_layers(model, adalora_layers(model), merge_adapter)
    if hasattr(model, "deltatune_state"):
        delattr(model, "deltatune_state")
    return model


# ------------------------------------------------------------------------------------ files (PEFT layout)
_PARTS = ("lora_A", "lora_B", "lora_E")


def save_peft(model: nn.Module, path: Path, name: str) -> Path:
    """Write AdaLoRA adapter ``name`` as PEFT does: pruned triplets cut out, ``rank_pattern`` in the config."""
    import json

    from safetensors.torch import save

    from ..inject import get_state
    from ..io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, atomic_write_bytes, fingerprint

    cfg: AdaLoraConfig = get_state(model).configs[name]
    layers = adalora_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    pattern: dict[str, list[bool]] = {}
    for p, layer in layers:
        a, b, e = (t.detach() for t in layer.factors())
        if layer.kept is not None:
            pattern[f"{p}.lora_E"] = layer.kept
            if layer.r == len(layer.kept):  # still init_r wide in memory: cut the masked triplets out
                keep = torch.tensor(layer.kept, device=a.device)
                a, b, e = a[keep], b[:, keep], e[keep]
        tensors.update({f"{PREFIX}{p}.lora_A": a, f"{PREFIX}{p}.lora_B": b, f"{PREFIX}{p}.lora_E": e})
    tensors = {k: v.float().contiguous().cpu().clone() for k, v in tensors.items()}
    paths = sorted(p for p, _ in layers)
    meta = {"format": "pt", "deltatune_fingerprint": json.dumps(fingerprint(model, paths)),
            "deltatune_orth_reg": cfg.orth_reg}
    from ..io import base_name_or_path

    name_or_path = base_name_or_path(model)
    peft_cfg = {
        "peft_type": "ADALORA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": 8,  # unused by AdaLoRA; PEFT warns when it differs from its default
        "init_r": cfg.init_r,
        "target_r": cfg.target_r,
        "tinit": cfg.tinit,
        "tfinal": cfg.tfinal,
        "deltaT": cfg.delta_t,
        "beta1": cfg.beta1,
        "beta2": cfg.beta2,
        "orth_reg_weight": cfg.orth_reg_weight,
        "total_step": cfg.total_step,
        "rank_pattern": pattern or None,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": paths,  # exact paths: PEFT adapts the same modules
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "fan_in_fan_out": bool(layers) and all(layer.kind == "conv1d" for _, layer in layers),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "alpha_pattern": {},
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata=meta))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n").encode())
    return out


def _pattern_path(key: str) -> str:
    # PEFT writes 'model.layers.0.self_attn.q_proj.lora_E'; in memory it also has '….lora_E.<adapter>'.
    return key[: -len(".lora_E")] if key.endswith(".lora_E") else key.split(".lora_E.")[0]


def load_peft(model: nn.Module, f: AdapterFile, name: str, *, trainable: bool = False,
              activate: bool = True) -> nn.Module:
    """Load a parsed PEFT AdaLoRA directory onto ``model`` (ranks as saved; no allocator attached).
    Every module path and shape is checked before the model changes."""
    from ..io import PREFIX, WEIGHTS_NAME, AdapterFileError, AdapterMismatchError, _check_fingerprint

    where = f.directory / WEIGHTS_NAME
    c = f.config
    if c.get("bias", "none") != "none" or c.get("modules_to_save"):
        raise AdapterFileError(f"{f.directory}: AdaLoRA files with bias={c.get('bias')!r} / modules_to_save are not supported")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in f.tensors.items():
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        mpath, _, part = body.rpartition(".")
        if part not in _PARTS:
            raise AdapterFileError(f"{where}: unexpected tensor {key!r} in an AdaLoRA file")
        parts.setdefault(mpath, {})[part] = t
    if not parts:
        raise AdapterFileError(f"{where}: holds no AdaLoRA tensors (lora_A / lora_B / lora_E)")
    pattern = {_pattern_path(k): [bool(v) for v in vals] for k, vals in (c.get("rank_pattern") or {}).items()}
    try:
        how = f.config.get("deltatune_orth_reg", "peft")
        cfg = AdaLoraConfig(
            init_r=int(c.get("init_r", 12)), target_r=min(int(c.get("target_r", 8)), int(c.get("init_r", 12))),
            alpha=float(c.get("lora_alpha", 8)), dropout=float(c.get("lora_dropout") or 0.0),
            target_modules=sorted(parts), tinit=int(c.get("tinit", 0)), tfinal=int(c.get("tfinal", 0)),
            delta_t=int(c.get("deltaT", 1)), beta1=float(c.get("beta1", 0.85)), beta2=float(c.get("beta2", 0.85)),
            orth_reg_weight=float(c.get("orth_reg_weight", 0.5)), orth_reg=how if how in ("peft", "paper") else "peft",
            total_step=c.get("total_step"))
    except (ValueError, TypeError) as e:
        raise AdapterFileError(f"{f.directory}: invalid AdaLoRA config ({e})") from e
    modules = dict(model.named_modules())
    ranks: dict[str, int] = {}
    for mpath, got in parts.items():
        module = modules.get(mpath)
        if module is None:
            raise AdapterMismatchError(f"{f.directory}: adapter module {mpath!r} does not exist in {type(model).__name__}")
        if supported_base(module) not in ("linear", "conv1d"):
            raise AdapterMismatchError(f"{f.directory}: module {mpath!r} is a {type(module).__name__}; AdaLoRA needs "
                                       "nn.Linear or Conv1D (is an adapter already loaded?)")
        missing = [p for p in _PARTS if p not in got]
        if missing:
            raise AdapterFileError(f"{where}: module {mpath!r} lacks {missing}")
        r = got["lora_A"].shape[0]
        k, d = base_shape(module)
        for part, shape in (("lora_A", (r, k)), ("lora_B", (d, r)), ("lora_E", (r, 1))):
            if tuple(got[part].shape) != shape:
                raise AdapterMismatchError(f"{f.directory}: module {mpath!r}: {part} has shape {list(got[part].shape)} "
                                           f"but the model needs {list(shape)}")
        kept = pattern.get(mpath)
        want = sum(kept) if kept is not None else cfg.init_r
        if r != want or (kept is not None and len(kept) != cfg.init_r):
            raise AdapterFileError(f"{f.directory}: module {mpath!r} has rank {r} in the file but the config's "
                                   f"init_r/rank_pattern say {want}")
        ranks[mpath] = r
    if f.fingerprint:
        _check_fingerprint(model, f.fingerprint, f.directory)

    # ---- all checks passed: now change the model
    inject_adalora(model, cfg, name, ranks=ranks)
    with torch.no_grad():
        for mpath, got in parts.items():
            layer = model.get_submodule(mpath)
            assert isinstance(layer, AdaLoraLayer)
            for param, part in zip(layer.factors(), _PARTS):
                param.copy_(got[part])
                param.requires_grad_(trainable)
            layer.kept = pattern.get(mpath)
    return model
