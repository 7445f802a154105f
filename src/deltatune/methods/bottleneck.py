"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021; MISSION §5).

At each adapted site the sublayer output h (…, d) becomes

    h ← h + W_up·f(W_down·h + b_down) + b_up        W_down (r, d), W_up (d, r), r ≪ d

with W_up = 0 and b_up = 0 at the start, so the adapted model starts exactly at the base model.
2dr + r + d parameters per site. Placements:
  houlsby   after the attention sublayer AND after the feed-forward sublayer of every block (§2.1, Fig. 2)
  pfeiffer  after the feed-forward sublayer only (AdapterFusion §3, the "Pfeiffer" configuration)

The adapter sits on the sublayer's output *before* the block adds its residual (and, in post-LN
BERT, before the LayerNorm), as in Houlsby's Fig. 2. It is applied by a forward hook on that
sublayer module, so the base model's code and state-dict keys stay as they are; the adapter
parameters live in a small module attached to the block (``<block>.bottleneck_attn`` /
``<block>.bottleneck_ffn``). Sites per family (first match inside each block):
  Llama/Mistral/Qwen  self_attn, mlp                  (pre-LN: h = x + sublayer(norm(x)))
  GPT-2               attn, mlp
  BERT/RoBERTa        attention.output.dropout, output.dropout   (dense → dropout → [adapter] → LN(· + x))

PEFT has no bottleneck adapters, so files use deltatune's own format (see :func:`save_peft`).
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .lora import weight_checksum

if TYPE_CHECKING:
    from ..io import AdapterFile

__all__ = ["BottleneckConfig", "BottleneckLayer", "ACTIVATIONS", "INIT_SCHEMES", "find_sites", "bottleneck_layers",
           "inject", "set_active", "disable", "delete", "save_peft", "load_peft"]

FORMAT_VERSION = 1
_SITES: dict[str, tuple[str, ...]] = {
    "attn": ("attention.output.dropout", "self_attn", "attn", "attention", "self_attention"),
    "ffn": ("output.dropout", "mlp", "ffn", "feed_forward"),
}
_PLACEMENTS = {"houlsby": ("attn", "ffn"), "pfeiffer": ("ffn",)}

#: The nonlinearity f, by name.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh,
}


def _init_kaiming(w: torch.Tensor) -> None:
    # nn.Linear's own init (as LoRA's A in PEFT): W_down large enough that W_up gets a useful gradient at step 1.
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))


def _init_houlsby(w: torch.Tensor) -> None:
    # Houlsby §3.6: zero-mean Gaussian, std 1e-2, truncated to two standard deviations.
    nn.init.trunc_normal_(w, std=1e-2, a=-2e-2, b=2e-2)


#: W_down initialisation schemes; W_up, b_up, b_down start at zero whichever is chosen.
INIT_SCHEMES: dict[str, Callable[[torch.Tensor], None]] = {"kaiming": _init_kaiming, "houlsby": _init_houlsby}


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class BottleneckConfig:
    """h ← h + W_up·f(W_down·h + b_down) + b_up at each site; W_up = 0 at init."""

    PEFT_TYPE: ClassVar[str] = "DELTATUNE_BOTTLENECK"

    r: int = field(default=16, metadata=_doc("Bottleneck width r (W_down is r×d, W_up is d×r)."))
    placement: Literal["houlsby", "pfeiffer"] = field(
        default="houlsby",
        metadata=_doc("'houlsby': after attention and after the FFN of each block; 'pfeiffer': after the FFN only."),
    )
    activation: Literal["relu", "gelu", "silu", "tanh"] = field(default="relu", metadata=_doc("The nonlinearity f."))
    init: Literal["kaiming", "houlsby"] = field(
        default="kaiming",
        metadata=_doc("W_down init: 'kaiming' (nn.Linear's) or 'houlsby' (N(0, 1e-2²) truncated at 2σ); W_up = 0."),
    )
    layers_to_transform: list[int] | None = field(
        default=None, metadata=_doc("Only adapt these block indices (null: every block).")
    )
    attn_module: str | None = field(
        default=None, metadata=_doc("Attention site inside a block, e.g. 'self_attn' (null: found by architecture).")
    )
    ffn_module: str | None = field(
        default=None, metadata=_doc("Feed-forward site inside a block, e.g. 'mlp' (null: found by architecture).")
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"bottleneck.r must be >= 1, got {self.r}")
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"bottleneck.placement must be one of {sorted(_PLACEMENTS)}, got {self.placement!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"bottleneck.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"bottleneck.init must be one of {sorted(INIT_SCHEMES)}, got {self.init!r}")


class BottleneckLayer(nn.Module):
    """The named adapters of one site. Shapes: h (…, d); down[name] Linear d → r; up[name] Linear r → d."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.down = nn.ModuleDict()
        self.up = nn.ModuleDict()
        self.activation: dict[str, str] = {}
        self.active: list[str] = []
        self.disabled = False
        self.handle: Any = None  # the forward hook on the site module

    def add(self, name: str, r: int, activation: str, init: str, device: torch.device | None = None) -> None:
        if name in self.down:
            raise ValueError(f"adapter {name!r} already exists on this site")
        down = nn.Linear(self.d, r, device=device)  # fp32 master weights whatever the base dtype
        INIT_SCHEMES[init](down.weight)
        nn.init.zeros_(down.bias)
        up = nn.Linear(r, self.d, device=device)
        nn.init.zeros_(up.weight)  # W_up = 0, b_up = 0 ⇒ the adapter starts as the identity
        nn.init.zeros_(up.bias)
        self.down[name], self.up[name] = down, up
        self.activation[name] = activation

    def delete(self, name: str) -> None:
        del self.down[name], self.up[name]
        self.activation.pop(name)
        self.active = [n for n in self.active if n != name]

    def linears(self, name: str) -> tuple[nn.Linear, nn.Linear]:
        """(down, up) of adapter ``name``."""
        down, up = self.down[name], self.up[name]
        assert isinstance(down, nn.Linear) and isinstance(up, nn.Linear)
        return down, up

    def delta(self, h: torch.Tensor, name: str) -> torch.Tensor:
        """W_up·f(W_down·h + b_down) + b_up, computed in h's dtype (casting the small weights, never h)."""
        down, up = self.linears(name)
        z = F.linear(h, down.weight.to(h.dtype), down.bias.to(h.dtype))  # (…, r)
        return F.linear(ACTIVATIONS[self.activation[name]](z), up.weight.to(h.dtype), up.bias.to(h.dtype))  # (…, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.disabled or not self.active:
            return h
        out = h
        for name in self.active:  # several active adapters add up, like LoRA's
            out = out + self.delta(h, name)
        return out

    def hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        # A bound method, so copy.deepcopy(model) re-points the copied hook at the copied layer.
        if isinstance(output, tuple):  # attention modules return (output, weights)
            return (self(output[0]), *output[1:])
        return self(output)

    def extra_repr(self) -> str:
        parts = [f"{n}: r={self.down[n].out_features}, f={self.activation[n]}" for n in self.down]
        return f"d={self.d}, adapters=[{'; '.join(parts)}], active={self.active}"


# ---------------------------------------------------------------------------------- injection
def _hidden_size(model: nn.Module) -> int:
    cfg: Any = getattr(model, "config", None)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    d = getattr(cfg, "hidden_size", None)
    if d is None:
        raise ValueError(f"{type(model).__name__}: no config.hidden_size to size the bottleneck adapters by")
    return int(d)


def find_sites(model: nn.Module, config: BottleneckConfig) -> list[tuple[str, str]]:
    """(adapter module path, hooked site module path) per adapted site, in model order."""
    from ..structure import block_list

    prefix, blocks = block_list(model)
    wanted = _PLACEMENTS[config.placement]
    overrides = {"attn": config.attn_module, "ffn": config.ffn_module}
    found: list[tuple[str, str]] = []
    for i, block in enumerate(blocks):
        if config.layers_to_transform is not None and i not in config.layers_to_transform:
            continue
        names = dict(block.named_modules())
        for kind in wanted:
            candidates = (overrides[kind],) if overrides[kind] else _SITES[kind]
            rel = next((c for c in candidates if c in names), None)
            if rel is None:
                raise ValueError(
                    f"bottleneck: no {kind} sublayer in block {prefix}.{i} ({type(block).__name__}); tried "
                    f"{list(candidates)}; set bottleneck.{kind}_module to one of {sorted(n for n in names if n)[:20]}")
            found.append((f"{prefix}.{i}.bottleneck_{kind}", f"{prefix}.{i}.{rel}"))
    if not found:
        raise ValueError(f"bottleneck.layers_to_transform={config.layers_to_transform} selects none of the "
                         f"{len(blocks)} blocks")
    return found


def bottleneck_layers(model: nn.Module) -> Iterator[tuple[str, BottleneckLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, BottleneckLayer):
            yield name, module


def _state(model: nn.Module) -> Any:
    from ..inject import AdapterState

    state = getattr(model, "deltatune_state", None)
    return state if isinstance(state, AdapterState) else AdapterState()


def inject(model: nn.Module, config: BottleneckConfig, name: str = "default") -> nn.Module:
    """Add bottleneck adapter ``name`` at every site the config selects, make it active and the only
    trainable parameters, and return the model."""
    state = _state(model)
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists; pick another name")
    sites = find_sites(model, config)  # validates before anything changes
    d = _hidden_size(model)
    device = next(model.parameters()).device
    for adapter_path, site_path in sites:
        block_path, _, attr = adapter_path.rpartition(".")
        block = model.get_submodule(block_path)
        layer = getattr(block, attr, None)
        if not isinstance(layer, BottleneckLayer):
            layer = BottleneckLayer(d)
            setattr(block, attr, layer)
            layer.handle = model.get_submodule(site_path).register_forward_hook(layer.hook)
        layer.add(name, config.r, config.activation, config.init, device)
    state.configs[name] = config
    model.deltatune_state = state  # type: ignore[assignment]
    set_active(model, name)
    return model


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Activate bottleneck adapter(s) (their outputs add up) and make exactly their parameters trainable."""
    names = [names] if isinstance(names, str) else list(names)
    layers = [layer for _, layer in bottleneck_layers(model)]
    for n in names:
        if not any(n in layer.down for layer in layers):
            have = sorted({k for layer in layers for k in layer.down})
            raise ValueError(f"no bottleneck adapter named {n!r}; this model has {have}")
    model.requires_grad_(False)
    for layer in layers:
        layer.active = [n for n in names if n in layer.down]
        for n in layer.down:
            layer.down[n].requires_grad_(n in names)
            layer.up[n].requires_grad_(n in names)
    _state(model).active = names


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base model."""
    layers = [layer for _, layer in bottleneck_layers(model)]
    try:
        for layer in layers:
            layer.disabled = True
        yield
    finally:
        for layer in layers:
            layer.disabled = False


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; a site left without adapters loses its hook and module."""
    for path, layer in list(bottleneck_layers(model)):
        if name in layer.down:
            layer.delete(name)
        if not len(layer.down):
            layer.handle.remove()
            block_path, _, attr = path.rpartition(".")
            delattr(model.get_submodule(block_path), attr)
    state = _state(model)
    state.configs.pop(name, None)
    state.active = [n for n in state.active if n != name]


# ---------------------------------------------------------------------------------- files
def _fingerprint(model: nn.Module, sites: list[tuple[str, str]]) -> dict[str, Any]:

    cfg = getattr(model, "config", None)
    checks: dict[str, float] = {}
    for adapter_path, _ in sites:
        block = model.get_submodule(adapter_path.rpartition(".")[0])
        w = next(p for n, p in block.named_parameters() if not n.startswith("bottleneck_"))
        checks[adapter_path] = weight_checksum(w)  # the block's first base weight
    return {"architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(cfg, "model_type", None), "hidden_size": _hidden_size(model), "blocks": checks}


def save_peft(model: nn.Module, path: Path, name: str) -> Path:
    """Write adapter ``name`` in deltatune's bottleneck format (PEFT has no such method):

    ``adapter_config.json``: the :class:`BottleneckConfig` fields plus ``peft_type:
    "DELTATUNE_BOTTLENECK"``, ``format_version``, ``task_type``, ``base_model_name_or_path``.
    ``adapter_model.safetensors``: per site ``<block>.bottleneck_<attn|ffn>.{down,up}.{weight,bias}``
    (fp32; down.weight (r, d), down.bias (r,), up.weight (d, r), up.bias (d,)); its metadata holds the
    base-model fingerprint (architecture, hidden size, a checksum per adapted block).
    """
    from safetensors.torch import save

    from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes, base_name_or_path

    config = _state(model).configs[name]
    assert isinstance(config, BottleneckConfig)
    tensors: dict[str, torch.Tensor] = {}
    paths: list[tuple[str, str]] = []
    for p, layer in bottleneck_layers(model):
        if name in layer.down:
            paths.append((p, ""))
            for part, lin in zip(("down", "up"), layer.linears(name)):
                tensors[f"{p}.{part}.weight"] = lin.weight.detach().float().cpu().contiguous().clone()
                tensors[f"{p}.{part}.bias"] = lin.bias.detach().float().cpu().contiguous().clone()
    meta = {"format": "pt", "deltatune_fingerprint": json.dumps(_fingerprint(model, paths))}
    can_generate = getattr(model, "can_generate", None)
    out = {"peft_type": BottleneckConfig.PEFT_TYPE, "format_version": FORMAT_VERSION,
           "task_type": "CAUSAL_LM" if callable(can_generate) and can_generate() else None,
           "base_model_name_or_path": base_name_or_path(model), **asdict(config)}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_NAME, save(tensors, metadata=meta))
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(out, indent=2, sort_keys=True) + "\n").encode())
    return path


def _config_from_file(c: dict[str, Any], where: Path) -> BottleneckConfig:
    from ..io import AdapterFileError

    version = c.get("format_version")
    if version != FORMAT_VERSION:
        raise AdapterFileError(f"{where}: bottleneck format_version={version!r}; this deltatune reads {FORMAT_VERSION}")
    keys = ("r", "placement", "activation", "init", "layers_to_transform", "attn_module", "ffn_module")
    try:
        return BottleneckConfig(**{k: c[k] for k in keys if k in c})
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: {e}") from e


def load_peft(model: nn.Module, f: AdapterFile, name: str, *, trainable: bool = False,
              activate: bool = True) -> nn.Module:
    """Load a deltatune bottleneck directory. Every site and shape is checked before the model changes."""
    from ..io import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, AdapterMismatchError

    config = _config_from_file(f.config, f.directory / CONFIG_NAME)
    try:
        sites = find_sites(model, config)
    except ValueError as e:
        raise AdapterMismatchError(f"{f.directory}: {e}") from e
    d = _hidden_size(model)
    want: dict[str, tuple[int, ...]] = {}
    for p, _ in sites:
        want.update({f"{p}.down.weight": (config.r, d), f"{p}.down.bias": (config.r,),
                     f"{p}.up.weight": (d, config.r), f"{p}.up.bias": (d,)})
    extra = sorted(set(f.tensors) - set(want))
    if extra:
        raise AdapterMismatchError(f"{f.directory}: {extra[0]} has no counterpart in this {type(model).__name__} "
                                   f"(its adapter sites are {[p for p, _ in sites][:4]} …)")
    for key, shape in want.items():
        if key not in f.tensors:
            raise AdapterFileError(f"{f.directory / WEIGHTS_NAME}: lacks {key}")
        if tuple(f.tensors[key].shape) != shape:
            raise AdapterMismatchError(
                f"{f.directory}: {key} has shape {list(f.tensors[key].shape)} in the file but this model needs "
                f"{list(shape)} (hidden size {d}, r={config.r}); the adapter was made for a different base model")
    if f.fingerprint:
        theirs = f.fingerprint.get("blocks") or {}
        ours = _fingerprint(model, sites)["blocks"]
        for p, value in theirs.items():
            if p in ours and not math.isclose(ours[p], float(value), rel_tol=2e-2, abs_tol=1e-6):
                warnings.warn(f"{f.directory}: the base weights of {p.rpartition('.')[0]!r} differ from those the "
                              "adapter was trained on; outputs will not match the trained model", stacklevel=3)
                break
    state = _state(model)
    previous = [n for n in state.active if isinstance(state.configs.get(n), BottleneckConfig)]
    inject(model, config, name)
    with torch.no_grad():
        for p, layer in bottleneck_layers(model):
            if name in layer.down:
                for part, lin in zip(("down", "up"), layer.linears(name)):
                    lin.weight.copy_(f.tensors[f"{p}.{part}.weight"])
                    lin.bias.copy_(f.tensors[f"{p}.{part}.bias"])
    if not activate and previous:
        set_active(model, previous)
    if not trainable:
        for _, layer in bottleneck_layers(model):
            if name in layer.down:
                layer.down[name].requires_grad_(False)
                layer.up[name].requires_grad_(False)
    return model
