"""VeRA — vector-based random matrix adaptation (Kopiczko et al. 2024; MISSION §6).

    h = W₀x + Λ_b · B · Λ_d · A · drop(x),   Λ_b = diag(b), Λ_d = diag(d)

One pair of frozen random matrices is shared by every adapted layer of the model: A (r, k_max) and
B (d_max, r), where k_max / d_max are the largest input / output widths among the adapted layers;
a layer with widths (k, d) uses the slices A[:, :k] and B[:d, :] (as PEFT does). They are drawn from
a seeded CPU generator (``projection_prng_key``) with PEFT's Kaiming-uniform bound √6/√fan_in,
A first, then B, so the same seed gives bit-identical matrices in PEFT and here. Only the vectors
d ∈ ℝ^r (init ``d_initial``) and b ∈ ℝ^{d_out} (init 0, so ΔW = 0 at the start; paper §3.2) train:
d_out + r parameters per layer.

Layout (PEFT's names, so the file translation is a prefix):
  in memory  <path>.vera_lambda_b.<adapter> (d,)   <path>.vera_lambda_d.<adapter> (r,)
             <path>.vera_proj.{A,B}  — one module object shared by all layers, non-persistent buffers
  in a file  base_model.model.<path>.vera_lambda_b / _d,  base_model.vera_A / base_model.vera_B
             (the projections only with ``save_projection``; otherwise regenerated from the seed)

Supported base layers: nn.Linear and GPT-2 Conv1D (PEFT supports the same two).
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .lora import base_shape, supported_base, weight_of
from .single import SingleAdapterLayer, unload_layers

if TYPE_CHECKING:
    from ..io import AdapterFile

__all__ = ["VeraConfig", "VeraLayer", "VeraProjections", "inject_vera", "vera_layers", "delta_weight",
           "kaiming_projection", "merge", "unmerge", "unload", "save_peft", "load_peft"]


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class VeraConfig:
    """h = W₀x + b ⊙ (B·(d ⊙ (A·drop(x)))): shared frozen A, B; trainable d (r) and b (d_out) per layer."""

    PEFT_TYPE: ClassVar[str] = "VERA"

    r: int = field(default=256, metadata=_doc(
        "Rank of the shared random projections (A is r×k_max, B is d_max×r). Larger than LoRA ranks: "
        "it costs only r parameters per layer (PEFT default 256)."))
    target_modules: list[str] | str = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata=_doc("Modules to adapt (nn.Linear or Conv1D): exact names or dotted suffixes, a regex, "
                      "or 'all-linear'."))
    exclude_modules: list[str] | str | None = field(
        default=None, metadata=_doc("Names/suffixes (list) or a regex (string) never adapted."))
    layers_to_transform: list[int] | None = field(
        default=None, metadata=_doc("Only adapt these block indices."))
    projection_prng_key: int = field(default=0, metadata=_doc(
        "Seed of the CPU generator that draws the shared A and B (PEFT's projection_prng_key)."))
    save_projection: bool = field(default=True, metadata=_doc(
        "Write A and B into the adapter file (otherwise a loader regenerates them from the seed)."))
    dropout: float = field(default=0.0, metadata=_doc("Dropout on the adapter input only."))
    d_initial: float = field(default=0.1, metadata=_doc("Initial value of every entry of d (paper: ≤ 0.1)."))
    b_init: Literal["zeros", "ones"] = field(default="zeros", metadata=_doc(
        "Initial b: 'zeros' (paper, PEFT: ΔW = 0, training starts at the pretrained model) or 'ones' "
        "(the lecture's init: ΔW ≠ 0 at step 0)."))

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"vera.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"vera.dropout must be in [0, 1), got {self.dropout!r}")
        from deltatune.validate import number

        number("vera.d_initial", self.d_initial, gt=0, hint="d scales every update; 0 would train nothing")
        if self.b_init not in ("zeros", "ones"):
            raise ValueError(f"vera.b_init must be 'zeros' or 'ones', got {self.b_init!r}")
        if isinstance(self.target_modules, list | tuple) and not self.target_modules:
            raise ValueError("vera.target_modules is empty: name at least one module, a regex, or 'all-linear'")


# ------------------------------------------------------------------------------------ projections
def kaiming_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(−√6/√fan_in, √6/√fan_in) with fan_in = shape[1] (Kaiming-uniform, gain √2), drawn on the CPU
    from ``generator`` — PEFT's ``_kaiming_init`` draw for draw."""
    t = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen pair shared by all VeRA layers: A (r, k_max), B (d_max, r).

    The same module object is a child of every layer, so ``model.to(device)`` moves its buffers once
    and all layers keep pointing at the one copy. Buffers are non-persistent: the model's own
    ``state_dict`` (and ``save_pretrained`` after ``unload``) never carries them."""

    A: torch.Tensor
    B: torch.Tensor

    def __init__(self, r: int, k_max: int, d_max: int, seed: int, device: torch.device | None = None) -> None:
        super().__init__()
        g = torch.Generator(device="cpu").manual_seed(seed)
        a = kaiming_projection((r, k_max), g)  # drawn first, as in PEFT
        b = kaiming_projection((d_max, r), g)
        self.register_buffer("A", a.to(device), persistent=False)
        self.register_buffer("B", b.to(device), persistent=False)
        self._last: tuple[Any, ...] | None = None  # (weakref x, key, weakref A·x): see project()

    def project(self, x: torch.Tensor, x2: torch.Tensor, k: int, dt: torch.dtype) -> torch.Tensor:
        """A[:, :k]·x for the rows x2 (N, k) of the layer input x → (N, r).

        Layers that read the same input tensor (q/k/v, gate/up) and the same slice share one product:
        one (N, k)×(k, r) matmul instead of one per layer forward, and autograd sums their gradients
        into it, so one matmul back to x in backward as well. Only weak references are kept: the
        product lives as long as the autograd graph that saved it, and x must be unchanged (version)."""
        if not torch.is_grad_enabled() or x.is_inference():  # no graph would keep a product alive anyway
            return F.linear(x2, self.A[:, :k].to(dt))
        key = (x._version, self.A._version, k, dt)
        last = self._last
        if last is not None and last[0]() is x and last[1] == key:
            xa = last[2]()
            if xa is not None:
                return xa  # type: ignore[no-any-return]
        xa = F.linear(x2, self.A[:, :k].to(dt))
        self._last = (weakref.ref(x), key, weakref.ref(xa))
        return xa

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_last"] = None  # weak references neither pickle nor mean anything in a copy
        return state

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, B={tuple(self.B.shape)}"


# ------------------------------------------------------------------------------------ layer
def delta_weight(kind: str, a: torch.Tensor, b: torch.Tensor, lam_d: torch.Tensor, lam_b: torch.Tensor) -> torch.Tensor:
    """ΔW = Λ_b B Λ_d A in the base weight's layout, in fp32 (pure function; used by merge).
    a (r, k) and b (d, r) are the layer's slices of the shared matrices."""
    dw = (lam_b.detach().float()[:, None] * b.float()) @ (lam_d.detach().float()[:, None] * a.float())  # (d, k)
    return dw.t() if kind == "conv1d" else dw  # Conv1D stores Wᵀ (k, d)


class VeraLayer(SingleAdapterLayer):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) plus one VeRA adapter."""

    method = "VeRA"

    def __init__(self, base_layer: nn.Module, proj: VeraProjections, name: str, config: VeraConfig) -> None:
        super().__init__(base_layer, name)
        if proj.A.shape[1] < self.in_features or proj.B.shape[0] < self.out_features or proj.A.shape[0] != config.r:
            raise ValueError(f"shared projections A {tuple(proj.A.shape)} / B {tuple(proj.B.shape)} are too small "
                             f"for a ({self.in_features} → {self.out_features}) layer at r={config.r}")
        self.vera_proj = proj
        b0 = torch.zeros if config.b_init == "zeros" else torch.ones
        self.vera_lambda_b = nn.ParameterDict({name: nn.Parameter(b0(self.out_features, **self.factory))})
        self.vera_lambda_d = nn.ParameterDict(
            {name: nn.Parameter(torch.full((config.r,), config.d_initial, **self.factory))})
        self.r, self.dropout = config.r, config.dropout

    def slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's views of the shared matrices: A[:, :k] (r, k) and B[:d] (d, r)."""
        return self.vera_proj.A[:, : self.in_features], self.vera_proj.B[: self.out_features]

    def vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(d (r,), b (d_out,)) as stored."""
        return self.vera_lambda_d[self.name], self.vera_lambda_b[self.name]

    def delta(self) -> torch.Tensor:
        a, b = self.slices()
        lam_d, lam_b = self.vectors()
        return delta_weight(self.kind, a, b, lam_d, lam_b)

    def add_adapter(self, out: torch.Tensor, x2: torch.Tensor, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        a, b = self.slices()
        lam_d, lam_b = self.vectors()
        if self.dropout > 0.0 and self.training:  # each layer drops its own units: nothing to share
            xa = F.linear(F.dropout(x2, self.dropout, True), a.to(dt))
        else:
            xa = self.vera_proj.project(x, x2, self.in_features, dt)  # (N, r), shared by same-input layers
        h = xa * lam_d.to(dt)  # (N, r) = d ⊙ A·x
        hb = F.linear(h, b.to(dt))  # (N, d) = B·(d ⊙ A·x)
        return out.addcmul_(hb.to(out.dtype), lam_b.to(out.dtype))  # += b ⊙ …, in place, no (N, d) temporary

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapter={self.name}, r={self.r}, merged={self.merged}"



# ------------------------------------------------------------------------------------ model level
def vera_layers(model: nn.Module) -> list[tuple[str, VeraLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VeraLayer)]


def _targets(model: nn.Module, config: VeraConfig) -> list[tuple[str, nn.Module]]:
    from ..inject import find_targets
    from .lora_config import LoraConfig

    # Target matching is shared with LoRA (names, suffixes, regex, 'all-linear', layer subsets).
    spec = LoraConfig(target_modules=config.target_modules, exclude_modules=config.exclude_modules,
                      layers_to_transform=config.layers_to_transform)
    out = []
    for path in find_targets(model, spec):
        module = model.get_submodule(path)
        if supported_base(module) not in ("linear", "conv1d"):
            raise TypeError(f"target module {path!r} is a {type(module).__name__}; VeRA supports nn.Linear and Conv1D")
        out.append((path, module))
    return out


def inject_vera(model: nn.Module, config: VeraConfig, name: str = "default") -> nn.Module:
    """Add VeRA adapter ``name`` to ``model`` in place; only the d and b vectors stay trainable."""
    from ..inject import AdapterState, _set_module

    state = getattr(model, "deltatune_state", None)
    if isinstance(state, AdapterState) and state.configs:
        raise ValueError(f"this model already has deltatune adapters {sorted(state.configs)}; VeRA is added to a "
                         "model without adapters (one VeRA adapter per model, as its projections are shared)")
    targets = _targets(model, config)
    k_max = max(base_shape(m)[0] for _, m in targets)
    d_max = max(base_shape(m)[1] for _, m in targets)
    proj = VeraProjections(config.r, k_max, d_max, config.projection_prng_key, device=weight_of(targets[0][1]).device)
    for path, module in targets:
        _set_module(model, path, VeraLayer(module, proj, name, config))
    model.deltatune_state = AdapterState(configs={name: config}, active=[name])  # type: ignore[assignment]
    model.requires_grad_(False)
    for _, layer in vera_layers(model):
        for p in layer.vectors():
            p.requires_grad_(True)
    return model


def merge(model: nn.Module) -> nn.Module:
    """W ← W₀ + Λ_b B Λ_d A in every VeRA layer; undone by :func:`unmerge`."""
    for _, layer in vera_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in vera_layers(model):
        layer.unmerge()
    return model


def unload(model: nn.Module, merge_adapter: bool = True) -> nn.Module:
    """Remove the VeRA layers (merging them first unless ``merge_adapter=False``): a plain model."""
    unload_layers(model, vera_layers(model), merge_adapter)
    if hasattr(model, "deltatune_state"):
        del model.deltatune_state
    return model


# ------------------------------------------------------------------------------------ files (PEFT layout)
_B_KEY, _D_KEY = ".vera_lambda_b", ".vera_lambda_d"
_A_FILE, _B_FILE = "base_model.vera_A", "base_model.vera_B"


def save_peft(model: nn.Module, path: Path, name: str) -> Path:
    """Write VeRA adapter ``name`` as PEFT's adapter_config.json + adapter_model.safetensors."""
    import json

    from safetensors.torch import save

    from ..inject import get_state
    from ..io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, atomic_write_bytes, fingerprint

    cfg: VeraConfig = get_state(model).configs[name]
    layers = vera_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    for p, layer in layers:
        lam_d, lam_b = layer.vectors()
        tensors[f"{PREFIX}{p}{_B_KEY}"] = lam_b
        tensors[f"{PREFIX}{p}{_D_KEY}"] = lam_d
    if cfg.save_projection and layers:
        proj = layers[0][1].vera_proj
        tensors[_A_FILE], tensors[_B_FILE] = proj.A, proj.B
    tensors = {k: v.detach().float().contiguous().cpu().clone() for k, v in tensors.items()}
    paths = sorted(p for p, _ in layers)
    meta = {"format": "pt", "deltatune_fingerprint": json.dumps(fingerprint(model, paths)),
            "deltatune_b_init": cfg.b_init}
    from ..io import base_name_or_path

    name_or_path = base_name_or_path(model)
    peft_cfg = {
        "peft_type": "VERA",
        "task_type": "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None,
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "target_modules": paths,  # exact paths: PEFT adapts (and sizes A, B over) the same modules
        "projection_prng_key": cfg.projection_prng_key,
        "save_projection": cfg.save_projection,
        "vera_dropout": cfg.dropout,
        "d_initial": cfg.d_initial,
        "fan_in_fan_out": bool(layers) and all(layer.kind == "conv1d" for _, layer in layers),
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata=meta))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(peft_cfg, indent=2, sort_keys=True) + "\n").encode())
    return out


def load_peft(model: nn.Module, f: AdapterFile, name: str, *, trainable: bool = False,
              activate: bool = True) -> nn.Module:
    """Load a parsed PEFT VeRA directory onto ``model``. Every module path and shape is checked before
    the model changes. ``activate`` is accepted for the common signature (VeRA has one adapter)."""
    from ..io import PREFIX, WEIGHTS_NAME, AdapterFileError, AdapterMismatchError, _check_fingerprint

    where = f.directory / WEIGHTS_NAME
    c = f.config
    if c.get("bias", "none") != "none" or c.get("modules_to_save"):
        raise AdapterFileError(f"{f.directory}: VeRA files with bias={c.get('bias')!r} / modules_to_save are not supported")
    vecs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in f.tensors.items():
        body = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix in (_B_KEY, _D_KEY):
            if body.endswith(suffix):
                vecs.setdefault(body[: -len(suffix)], {})[suffix] = t
                break
        else:
            if key not in (_A_FILE, _B_FILE):
                raise AdapterFileError(f"{where}: unexpected tensor {key!r} in a VeRA file")
    if not vecs:
        raise AdapterFileError(f"{where}: holds no VeRA vectors (vera_lambda_b / vera_lambda_d)")
    init = f.config.get("deltatune_b_init", "zeros")
    cfg = VeraConfig(r=int(c.get("r", 256)), target_modules=sorted(vecs),
                     projection_prng_key=int(c.get("projection_prng_key", 0)),
                     save_projection=bool(c.get("save_projection", True)),
                     dropout=float(c.get("vera_dropout") or 0.0), d_initial=float(c.get("d_initial", 0.1)),
                     b_init=init if init in ("zeros", "ones") else "zeros")
    modules = dict(model.named_modules())
    dims = []
    for mpath, parts in vecs.items():
        module = modules.get(mpath)
        if module is None:
            raise AdapterMismatchError(f"{f.directory}: adapter module {mpath!r} does not exist in {type(model).__name__}")
        if supported_base(module) not in ("linear", "conv1d"):
            raise AdapterMismatchError(f"{f.directory}: module {mpath!r} is a {type(module).__name__}; VeRA needs "
                                       "nn.Linear or Conv1D (is an adapter already loaded?)")
        k, d = base_shape(module)
        dims.append((k, d))
        for suffix, want in ((_B_KEY, (d,)), (_D_KEY, (cfg.r,))):
            got = tuple(parts[suffix].shape) if suffix in parts else None
            if got != want:
                raise AdapterMismatchError(f"{f.directory}: module {mpath!r}: {suffix[1:]} has shape "
                                           f"{list(got) if got else 'missing'} but the model needs {list(want)}")
    need: dict[str, tuple[int, ...]] = {_A_FILE: (cfg.r, max(k for k, _ in dims)),
                                        _B_FILE: (max(d for _, d in dims), cfg.r)}
    for key, shape in need.items():
        if key in f.tensors and tuple(f.tensors[key].shape) != shape:
            raise AdapterMismatchError(f"{f.directory}: {key} has shape {list(f.tensors[key].shape)} but the "
                                       f"adapted modules need {list(shape)}")
    if (_A_FILE in f.tensors) != (_B_FILE in f.tensors):
        raise AdapterFileError(f"{where}: holds only one of {_A_FILE} / {_B_FILE}")
    if f.fingerprint:
        _check_fingerprint(model, f.fingerprint, f.directory)
    if cfg.save_projection and _A_FILE not in f.tensors:
        warnings.warn(f"{f.directory}: save_projection=true but the file has no vera_A/vera_B; regenerating them "
                      f"from projection_prng_key={cfg.projection_prng_key}", stacklevel=3)
        cfg = replace(cfg, save_projection=False)

    # ---- all checks passed: now change the model
    inject_vera(model, cfg, name)
    with torch.no_grad():
        for mpath, parts in vecs.items():
            layer = model.get_submodule(mpath)
            assert isinstance(layer, VeraLayer)
            lam_d, lam_b = layer.vectors()
            lam_b.copy_(parts[_B_KEY])
            lam_d.copy_(parts[_D_KEY])
        if _A_FILE in f.tensors:
            proj = vera_layers(model)[0][1].vera_proj
            proj.A.copy_(f.tensors[_A_FILE])
            proj.B.copy_(f.tensors[_B_FILE])
    for _, layer in vera_layers(model):
        for p in layer.vectors():
            p.requires_grad_(trainable)
    return model
