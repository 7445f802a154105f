"""Adapter files in HF PEFT's layout — ``adapter_config.json`` + ``adapter_model.safetensors`` — and
the one place where deltatune's in-memory names and PEFT's file keys are translated.

In memory (the wrapped model's ``state_dict``):  ``<path>.lora_A.<adapter>.weight``
In the file (PEFT):                              ``base_model.model.<path>.lora_A.weight``

The safetensors metadata also carries a fingerprint of the base model (architecture, the adapted
modules' shapes, a cheap checksum of their weights) so that loading onto the wrong base fails
*before* anything is changed, with a message that names the module and both shapes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .inject import (
    ModulesToSave,
    get_state,
    inject,
    lora_layers,
    set_active,
)
from .methods import dora, lora_init
from .methods.lora import LoraLayer, base_shape, supported_base, weight_checksum
from .methods.lora_config import LoraConfig
from .validate import check_tensors

__all__ = ["save_adapter", "load_adapter", "AdapterFileError", "AdapterMismatchError", "fingerprint",
           "read_adapter_info", "atomic_write_bytes"]

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


class AdapterFileError(ValueError):
    """An adapter file is missing, truncated, corrupted or of an unsupported kind."""


class AdapterMismatchError(ValueError):
    """An adapter does not fit the model it is being loaded onto."""


# ---------------------------------------------------------------------------------------- writing
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory + rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .fsutil import default_mode

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, default_mode())  # mkstemp makes 0600; an output follows the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with _suppress():
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: say which file
            raise OSError(e.errno, f"{e.strerror or e} (the previous file is kept)", str(path)) from e
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def fingerprint(model: nn.Module, paths: list[str]) -> dict[str, Any]:
    """Architecture and, for each adapted module, its (k, d) and a weight checksum of the *unmerged*
    base weight (captured when the layer was wrapped)."""
    cfg = getattr(model, "config", None)
    modules: dict[str, Any] = {}
    for path in paths:
        module = model.get_submodule(path)
        # Every method's wrapper keeps the frozen layer as ``base_layer`` (LoraLayer, VeraLayer, …).
        base = getattr(module, "base_layer", module)
        checksum = getattr(module, "base_checksum", None)
        if checksum is None:
            checksum = weight_checksum(base.weight)  # type: ignore[arg-type]
        modules[path] = {"shape": list(base_shape(base)), "checksum": checksum}
    return {
        "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(cfg, "model_type", None),
        "modules": modules,
    }


def base_name_or_path(model: nn.Module) -> str | None:
    """What adapter files record as ``base_model_name_or_path``: the name ``load_model`` gave the
    base (the Hub id of the default model, else the resolved spec path), else the config's
    ``_name_or_path``; None only for a model built from a bare config."""
    named = getattr(model, "deltatune_base_name", None)
    if isinstance(named, str) and named:
        return named
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


def _peft_config(model: nn.Module, cfg: LoraConfig, ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """PEFT's LoraConfig fields. target_modules is the exact list of adapted paths, so PEFT and we
    adapt the same modules however the user spelled the targets; per-module ranks/alphas that
    differ from the defaults go into rank_pattern/alpha_pattern with escaped paths as patterns."""
    import re

    name_or_path = base_name_or_path(model)
    kinds = [layer.kind for p, layer in lora_layers(model) if p in ranks]
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "modules_to_save": list(cfg.modules_to_save) or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(p): r for p, r in ranks.items() if r != cfg.r},
        "alpha_pattern": {re.escape(p): a for p, a in alphas.items() if a != cfg.alpha},
        # PEFT's flag for GPT-2 Conv1D weights (stored transposed); it sets it itself with a warning.
        "fan_in_fan_out": bool(kinds) and all(k == "conv1d" for k in kinds),
        "use_dora": cfg.use_dora,
    }


def adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's file keys."""
    state = get_state(model)
    cfg = state.configs[name]
    out: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name not in layer.adapters:
            continue
        a, b = lora_init.saved_factors(layer, name)  # PiSSA/OLoRA: rank 2r, relative to the original base
        for suffix, t in dora.file_tensors(layer, name).items():
            out[f"{PREFIX}{path}.{suffix}"] = t
        if layer.kind == "embedding":
            out[f"{PREFIX}{path}.lora_embedding_A"] = a
            out[f"{PREFIX}{path}.lora_embedding_B"] = b
        else:
            out[f"{PREFIX}{path}.lora_A.weight"] = a
            out[f"{PREFIX}{path}.lora_B.weight"] = b
        bias = getattr(layer.base_layer, "bias", None)
        if cfg.bias == "lora_only" and isinstance(bias, torch.Tensor):
            out[f"{PREFIX}{path}.base_layer.bias"] = bias
    if cfg.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith(".bias") and ".modules_to_save." not in pname and ".lora_" not in pname:
                out[f"{PREFIX}{pname}"] = p
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            for k, v in module.modules_to_save[name].state_dict().items():
                out[f"{PREFIX}{path}.{k}"] = v
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_adapter(model: nn.Module, path: str | Path, name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) as a PEFT-compatible directory.

    The files are written in a temporary sibling directory (fsynced, modes per the umask) and
    renamed into place, so a crash or a full disk never leaves half an adapter (fsutil.atomic_dir)."""
    state = get_state(model)
    name = name or (state.active[0] if state.active else next(iter(state.configs)))
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    from .fsutil import atomic_dir, merge_into_dir
    from .registry import kind_of

    kind, out = kind_of(state.configs[name]), Path(path)
    if out.is_dir() and any(out.iterdir()):
        # A directory that already holds files (an earlier save, a README): build the adapter in a
        # temporary sibling, then move each file in with an atomic rename; other files stay.
        staging = out.parent / f".{out.name}.new"
        with atomic_dir(staging, replaceable=lambda _: True, what="adapter directory") as tmp:
            kind.save(model, tmp, name)
        merge_into_dir(staging, out)
        return out
    with atomic_dir(out, what="adapter directory") as tmp:
        kind.save(model, tmp, name)
    return out


def save_lora(model: nn.Module, path: Path, name: str) -> Path:
    """:func:`save_adapter` for a LoRA (DoRA, PiSSA …) adapter: PEFT's LORA layout, into ``path``."""
    cfg = get_state(model).configs[name]
    ranks = {p: layer.adapters[name].r for p, layer in lora_layers(model) if name in layer.adapters}
    alphas = {p: layer.adapters[name].alpha for p, layer in lora_layers(model) if name in layer.adapters}
    from safetensors.torch import save

    cfg, ranks, alphas = lora_init.saved_config(cfg, ranks, alphas)
    tensors = adapter_tensors(model, name)
    # Tied/shared storage would make safetensors refuse to save; clone to own storage.
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta = {"format": "pt", "deltatune_fingerprint": json.dumps(fingerprint(model, sorted(ranks))),
            "deltatune_init": cfg.init}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata=meta))
    config_json = json.dumps(_peft_config(model, cfg, ranks, alphas), indent=2, sort_keys=True)
    atomic_write_bytes(out / CONFIG_NAME, (config_json + "\n").encode())
    return out


# ---------------------------------------------------------------------------------------- reading
@dataclass
class AdapterFile:
    """A parsed adapter directory: the PEFT config, the tensors by file key, and our metadata."""

    directory: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    fingerprint: dict[str, Any] | None


def _read_dir(path: str | Path) -> AdapterFile:
    from safetensors import SafetensorError
    from safetensors.torch import load

    d = Path(path)
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{cfg_path}: not found (an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    weights = d / WEIGHTS_NAME
    fp = None
    if weights.is_file():
        raw = weights.read_bytes()
        try:
            tensors = load(raw)
            # Header metadata (safetensors keeps it in the JSON header; read it without a 2nd parse lib).
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8 : 8 + n])
            meta = header.get("__metadata__") or {}
        except (SafetensorError, ValueError, json.JSONDecodeError, RuntimeError) as e:
            raise AdapterFileError(
                f"{weights}: cannot be read as safetensors ({e}); the file is truncated or corrupted"
            ) from e
        if "deltatune_fingerprint" in meta:
            fp = json.loads(meta["deltatune_fingerprint"])
        if "deltatune_init" in meta:
            config = {**config, "deltatune_init": meta["deltatune_init"]}
    elif (d / "adapter_model.bin").is_file():
        # Older PEFT files: load without unpickling arbitrary objects.
        try:
            tensors = torch.load(d / "adapter_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here is a bad file
            raise AdapterFileError(f"{d / 'adapter_model.bin'}: cannot be read ({e})") from e
    else:
        raise AdapterFileError(f"{weights}: not found")
    return AdapterFile(d, config, tensors, fp)


def read_adapter_info(path: str | Path) -> AdapterFile:
    """Parse an adapter directory without touching any model (for ``deltatune info``)."""
    return _read_dir(path)


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.x.y.lora_A.weight' → ('x.y', 'lora_A')."""
    body = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix in _FACTOR_SUFFIXES:
        if body.endswith(suffix):
            return body[: -len(suffix)], suffix.strip(".").split(".")[0]
    return body, ""


def _lora_config_from_peft(cfg: dict[str, Any], targets: list[str], where: Path) -> LoraConfig:
    peft_type = cfg.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterFileError(f"{where / CONFIG_NAME}: peft_type={peft_type!r}; this loader reads LORA adapters")
    init = cfg.get("deltatune_init")
    if init is None and isinstance(cfg.get("init_lora_weights"), str):
        # A PEFT file saved without conversion ('pissa', 'olora'): the init re-runs on the base first.
        init = cfg["init_lora_weights"]
    return LoraConfig(
        r=int(cfg.get("r", 8)),
        alpha=float(cfg.get("lora_alpha", 8)),
        dropout=float(cfg.get("lora_dropout") or 0.0),
        target_modules=targets,
        rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
        alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
        use_rslora=bool(cfg.get("use_rslora", False)),
        init=init if isinstance(init, str) and lora_init.is_known(init) else "kaiming",
        use_dora=bool(cfg.get("use_dora", False)),
        bias=str(cfg.get("bias", "none")),
        modules_to_save=list(cfg.get("modules_to_save") or []),
    )


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, *, trainable: bool = False,
                 activate: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter directory onto ``model`` as adapter ``name`` (default: 'default').

    Everything is validated — file integrity, every module path, every shape — before the model is
    changed; on any error the model is exactly as it was.
    """
    f = _read_dir(path)
    try:  # NaN weights would merge into a NaN model; an int32 factor would be cast without a word
        check_tensors(f.tensors, str(f.directory / WEIGHTS_NAME))
    except ValueError as e:
        raise AdapterFileError(str(e)) from None
    state = getattr(model, "deltatune_state", None)
    existing = set(getattr(state, "configs", {}) or {})
    name = name or "default"
    if name in existing:
        raise ValueError(f"adapter {name!r} already exists on this model; pass another name=")
    from .registry import kind_for_peft_type

    kind = kind_for_peft_type(str(f.config.get("peft_type", "LORA")), f.directory / CONFIG_NAME)
    return kind.load(model, f, name, trainable=trainable, activate=activate)


def load_lora(model: nn.Module, f: AdapterFile, name: str, *, trainable: bool = False,
              activate: bool = True) -> nn.Module:
    """:func:`load_adapter` for a PEFT LORA file (validated completely before the model changes)."""
    from .inject import pattern_or

    state = getattr(model, "deltatune_state", None)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}  # biases, modules_to_save, saved base embeddings
    magnitudes: dict[str, torch.Tensor] = {}  # DoRA: module path → m (d,)
    for key, t in f.tensors.items():
        module_path, part = _split_key(key)
        if part:
            factors.setdefault(module_path, {})[part] = t
        elif key.endswith("." + dora.MAGNITUDE_KEY):
            body = key[len(PREFIX):] if key.startswith(PREFIX) else key
            magnitudes[body[: -len(dora.MAGNITUDE_KEY) - 1]] = t
        else:
            # PEFT writes biases/saved embeddings of wrapped layers as '<path>.base_layer.<param>'.
            body = key[len(PREFIX):] if key.startswith(PREFIX) else key
            extra[body.replace(".base_layer.", ".")] = t
    if not factors:
        raise AdapterFileError(f"{f.directory / WEIGHTS_NAME}: holds no LoRA tensors (keys: {sorted(f.tensors)[:5]} …)")

    cfg = _lora_config_from_peft(f.config, sorted(factors), f.directory)
    if set(magnitudes) - (set(factors) if cfg.use_dora else set()):
        raise AdapterFileError(f"{f.directory / WEIGHTS_NAME}: DoRA magnitudes for {sorted(set(magnitudes) - set(factors))[:3]} "
                               f"but use_dora={cfg.use_dora} and LoRA factors for {sorted(factors)[:3]} …")
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    for mpath in sorted(factors, key=lambda p: order.get(p, -1)):
        parts = factors[mpath]
        module = modules.get(mpath)
        if module is None:
            close = [n for n in modules if n.endswith(mpath.split(".")[-1])][:3]
            raise AdapterMismatchError(
                f"{f.directory}: adapter module {mpath!r} does not exist in {type(model).__name__} "
                f"(similar: {close})"
            )
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = supported_base(base)
        if kind is None:
            raise AdapterMismatchError(f"{f.directory}: module {mpath!r} is a {type(base).__name__}; LoRA cannot wrap it")
        expected = _expected_shapes(kind, base, parts, mpath, f.directory)
        for part, shape in expected.items():
            got = tuple(parts[part].shape)
            if got != shape:
                raise AdapterMismatchError(
                    f"{f.directory}: module {mpath!r}: {part} has shape {list(got)} in the file but the model "
                    f"needs {list(shape)} (base {type(base).__name__} with (in, out) = {base_shape(base)}); "
                    "the adapter was made for a different base model"
                )
        r_file = parts[next(iter(expected))].shape[0]
        r_cfg = int(pattern_or(cfg.rank_pattern, mpath, cfg.r))
        if r_file != r_cfg:
            raise AdapterFileError(f"{f.directory}: module {mpath!r} has rank {r_file} in the file but the config says {r_cfg}")
        if cfg.use_dora and tuple(magnitudes.get(mpath, torch.empty(0)).shape) != (base_shape(base)[1],):
            got_m = list(magnitudes[mpath].shape) if mpath in magnitudes else "none"
            raise AdapterFileError(f"{f.directory}: module {mpath!r}: DoRA magnitude shape {got_m}, the model needs "
                                   f"[{base_shape(base)[1]}] (use_dora=true)")
    for key, t in extra.items():
        target = _find_param(model, key)
        if target is None:
            raise AdapterMismatchError(f"{f.directory}: tensor {key!r} has no counterpart in {type(model).__name__}")
        if tuple(target.shape) != tuple(t.shape):
            raise AdapterMismatchError(
                f"{f.directory}: {key!r} has shape {list(t.shape)} in the file but {list(target.shape)} in the model"
            )
    if f.fingerprint:
        _check_fingerprint(model, f.fingerprint, f.directory)

    # ---- all checks passed: now change the model
    previous_active = list(state.active) if state is not None else []
    inject(model, cfg, name=name)
    try:
        with torch.no_grad():
            for mpath, parts in factors.items():
                layer = model.get_submodule(mpath)
                assert isinstance(layer, LoraLayer)
                a, b = layer.factors(name)
                a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if layer.kind == "embedding" else ("lora_A", "lora_B")
                a.copy_(parts[a_key])
                b.copy_(parts[b_key])
                if cfg.use_dora:
                    dora.load_magnitude(layer, name, magnitudes[mpath])
            for key, t in extra.items():
                _load_extra(model, key, t, name)
    except Exception:
        from .inject import delete_adapter

        delete_adapter(model, name)
        raise
    if not activate and previous_active:
        set_active(model, previous_active)
    if not trainable:
        for _, layer in lora_layers(model):
            if name in layer.adapters:
                for p in layer.adapter_parameters(name) if isinstance(layer, dora.DoraLayer) else layer.factors(name):
                    p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, ModulesToSave) and name in m.modules_to_save:
                m.modules_to_save[name].requires_grad_(False)
    return model


def _expected_shapes(kind: str, base: nn.Module, parts: dict[str, torch.Tensor], mpath: str,
                     where: Path) -> dict[str, tuple[int, ...]]:
    k, d = base_shape(base)
    if kind == "embedding":
        need = ("lora_embedding_A", "lora_embedding_B")
    else:
        need = ("lora_A", "lora_B")
    for part in need:
        if part not in parts:
            raise AdapterFileError(f"{where / WEIGHTS_NAME}: module {mpath!r} lacks its {part} tensor")
    r = parts[need[0]].shape[0]
    if kind == "conv2d":
        assert isinstance(base, nn.Conv2d)
        kh, kw = base.kernel_size
        return {"lora_A": (r, k, kh, kw), "lora_B": (d, r, 1, 1)}
    if kind == "embedding":
        return {"lora_embedding_A": (r, k), "lora_embedding_B": (d, r)}
    return {"lora_A": (r, k), "lora_B": (d, r)}


def _find_param(model: nn.Module, key: str) -> torch.Tensor | None:
    owner, _, leaf = key.rpartition(".")
    try:
        module = model.get_submodule(owner) if owner else model
    except AttributeError:
        return None
    if isinstance(module, LoraLayer):
        module = module.base_layer
    if isinstance(module, ModulesToSave):
        module = module.original_module
    t = getattr(module, leaf, None)
    return t if isinstance(t, torch.Tensor) else None


def _load_extra(model: nn.Module, key: str, t: torch.Tensor, name: str) -> None:
    # modules_to_save copies: '<path>.<param>' where <path> is a ModulesToSave wrapper
    for mpath, module in model.named_modules():
        if isinstance(module, ModulesToSave) and key.startswith(mpath + "."):
            sub = key[len(mpath) + 1:]
            module.modules_to_save[name].load_state_dict({sub: t}, strict=False)
            return
    target = _find_param(model, key)
    assert target is not None
    if target.dtype != t.dtype or not torch.equal(target, t.to(target.dtype)):
        # PEFT does the same (bias='all'/'lora_only' and saved embeddings overwrite the base).
        target.copy_(t.to(target.dtype))


def _check_fingerprint(model: nn.Module, fp: dict[str, Any], where: Path) -> None:
    for mpath, info in (fp.get("modules") or {}).items():
        try:
            module = model.get_submodule(mpath)
        except AttributeError:
            continue  # reported by the shape checks with a better message
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if supported_base(base) is None:
            continue
        shape = list(base_shape(base))
        if shape != list(info["shape"]):
            raise AdapterMismatchError(
                f"{where}: module {mpath!r} was {info['shape']} (in, out) in the base the adapter was trained on, "
                f"but is {shape} in this model"
            )
        if base.weight.dtype == torch.uint8:  # type: ignore[union-attr]
            continue  # 4-bit packed base: checksum of a different representation
        ours = getattr(module, "base_checksum", None) or weight_checksum(base.weight)  # type: ignore[arg-type]
        theirs = float(info["checksum"])
        if not math.isclose(ours, theirs, rel_tol=2e-2, abs_tol=1e-6):
            warnings.warn(
                f"{where}: the base weights of {mpath!r} differ from those the adapter was trained on "
                f"(checksum {ours:.6g} vs {theirs:.6g}); outputs will not match the trained model",
                stacklevel=3,
            )
            return
