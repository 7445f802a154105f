"""4-bit model checkpoints in the transformers + bitsandbytes layout (MISSION §3, last bullet).

A directory written by :func:`save_4bit_checkpoint` is what ``model.save_pretrained`` writes for a
model loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)``: ``config.json`` carries the same
``quantization_config`` (built by transformers' own ``BitsAndBytesConfig.to_dict``), and the
safetensors hold, per quantized linear, the state-dict entries of :class:`Linear4bit`::

    <name>.weight (packed uint8), .weight.absmax, .weight.quant_map, [.weight.nested_absmax,
    .weight.nested_quant_map,] .weight.quant_state.bitsandbytes__nf4 (JSON bytes)

So ``AutoModelForCausalLM.from_pretrained(dir)`` with bitsandbytes installed loads it as a 4-bit
model, and :func:`load_4bit_checkpoint` (used by ``deltatune.models.load_model``) loads such a
directory — ours or one written by transformers — into deltatune's own :class:`Linear4bit`
layers, without bitsandbytes.  :func:`checkpoint_storage_report` reads the bytes by storage type
from the safetensors headers alone.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .linear4bit import Linear4bit

__all__ = [
    "is_4bit_checkpoint",
    "save_4bit_checkpoint",
    "load_4bit_checkpoint",
    "checkpoint_storage_report",
    "format_storage_report",
    "describe_checkpoint",
]

_QUANT_STATE_TAG = ".quant_state.bitsandbytes__"
_STAT_LEAVES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# safetensors header dtype names -> torch dtype names (the keys model_storage_report uses).
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "U8": "uint8",
              "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}


def _quantization_config(path: Path) -> dict[str, Any] | None:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    return qc if isinstance(qc, dict) else None


def is_4bit_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a model directory whose config.json says bitsandbytes 4-bit (``load_in_4bit``)."""
    qc = _quantization_config(Path(path))
    return bool(qc and qc.get("quant_method") == "bitsandbytes" and qc.get("load_in_4bit"))


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _bnb_config_dict(model: nn.Module) -> dict[str, Any]:
    """``BitsAndBytesConfig(...).to_dict()`` describing the Linear4bit layers of ``model``."""
    from transformers import BitsAndBytesConfig

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if not layers:
        raise ValueError("the model has no 4-bit layer; quantize it first (deltatune.quant.quantize_model)")
    kinds = {(m.quant_state.quant_type, m.quant_state.nested, m.compute_dtype) for m in layers}
    if len(kinds) > 1:  # the config is global: one quant type / double-quant flag / compute dtype
        raise ValueError(f"4-bit layers differ in (quant_type, double_quant, compute_dtype): {sorted(map(str, kinds))}")
    quant_type, nested, compute = kinds.pop()
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                             bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=compute,
                             llm_int8_skip_modules=_skip_modules(model))
    return cfg.to_dict()


def _skip_modules(model: nn.Module) -> list[str] | None:
    """The ``llm_int8_skip_modules`` value that makes transformers keep exactly our unquantized
    linears: None (its default skips: output head, tied weights) when that set is right."""
    from transformers.pytorch_utils import Conv1D

    # What transformers' replace_with_bnb_linear would turn into bnb Linear4bit.
    left = sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)))
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        defaults = get_keys_to_not_convert(model)
        default_left = sorted(
            n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D, Linear4bit)) and not should_convert_module(n, defaults)
        )
    except (ImportError, AttributeError):  # transformers moved its helpers: write the list out
        return left
    return None if default_left == left else left


def save_4bit_checkpoint(model: nn.Module, tokenizer: Any, out: str | os.PathLike[str],
                         extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (its linears :class:`Linear4bit`, no adapters) and ``tokenizer`` to ``out``
    (plus ``extra_files``: name → bytes, e.g. a merge report).

    Written to a temporary sibling directory, fsynced, then renamed into place
    (:func:`deltatune.fsutil.atomic_dir`), so a reader never sees a half-written checkpoint, and a
    full disk leaves the previous one.  An existing ``out`` is replaced only when it is empty or a
    model directory (has config.json); anything else is an error.
    """
    from ..fsutil import atomic_dir

    if hasattr(model, "deltatune_state"):
        raise ValueError("the model still holds adapters; merge them first (deltatune.unload)")
    target = Path(out)
    config: Any = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"{type(model).__name__} is not a transformers model (no config / save_pretrained)")
    qc = _bnb_config_dict(model)
    had = hasattr(config, "quantization_config")
    old = getattr(config, "quantization_config", None)
    try:
        with atomic_dir(target, replaceable=lambda p: (p / "config.json").is_file(), what="model directory") as tmp:
            config.quantization_config = qc
            hf: Any = model
            hf.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
    finally:
        if had:
            config.quantization_config = old
        elif hasattr(config, "quantization_config"):
            del config.quantization_config
    return target


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (4-bit checkpoints are read from safetensors)")
    return files


def load_4bit_checkpoint(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """A bitsandbytes 4-bit checkpoint directory -> a transformers causal LM whose quantized
    linears are deltatune :class:`Linear4bit` layers (no bitsandbytes needed).

    Which linears are 4-bit is read from the file (every ``<name>.weight`` with a quant state), not
    from ``llm_int8_skip_modules``.  Other weights load in ``dtype``.  The 4-bit layers compute in
    ``compute_dtype`` (default ``dtype``, as method ``qlora`` does; the file's
    ``bnb_4bit_compute_dtype`` is what bitsandbytes would use).  The state dict loads strictly.
    """
    import contextlib

    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    root = Path(path)
    config = AutoConfig.from_pretrained(root)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the 4-bit layers ourselves, not transformers' quantizer
    with contextlib.ExitStack() as stack:
        # Tensors are read one at a time straight into the model: a whole state dict in memory
        # next to the model would double the load peak (measured: +~300 MiB on SmolLM2-135M).
        handles = [stack.enter_context(safe_open(str(f), "pt")) for f in _safetensors_files(root)]
        where = {k: h for h in handles for k in h.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        # "<name>" of every 4-bit linear -> its quant-state JSON (shape, block size, quant type).
        metas = {k.split(".weight" + _QUANT_STATE_TAG)[0]: json.loads(bytes(where[k].get_tensor(k).numpy()))
                 for k in where if _QUANT_STATE_TAG in k}
        # Skeleton without initialisation: the fp weights of the linears we replace are never
        # written, so their pages are never resident.
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        claimed: set[str] = set()
        for name, meta in metas.items():
            lin = model.get_submodule(name)
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"{root}: {name!r} is 4-bit in the file but a {type(lin).__name__} in the model")
            keys = [k for k in where if k == f"{name}.bias" or k == f"{name}.weight" or k.startswith(f"{name}.weight.")]
            q = Linear4bit(lin.in_features, lin.out_features, lin.bias is not None, block_size=int(meta["blocksize"]),
                           double_quant=f"{name}.weight.nested_absmax" in where, quant_type=str(meta["quant_type"]),
                           compute_dtype=compute_dtype or dtype, dtype=dtype)
            # get_tensor returns views of the file's mmap; the quant state would keep them (and the
            # whole mapping, with every page read so far) alive: own copies instead.
            q.load_state_dict({k[len(name) + 1 :]: where[k].get_tensor(k).clone() for k in keys})  # strict
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, q)
            claimed.update(keys)
        target = model.state_dict(keep_vars=True)
        unexpected = [k for k in where if k not in claimed and k not in target]
        if unexpected:
            raise ValueError(f"{root}: tensors {unexpected[:5]} have no place in {type(model).__name__}")
        with torch.no_grad():
            for k in where:
                if k in claimed:
                    continue
                t = where[k].get_tensor(k)
                if tuple(t.shape) != tuple(target[k].shape):
                    raise ValueError(f"{root}: {k} has shape {list(t.shape)}, the model needs {list(target[k].shape)}")
                target[k].copy_(t)
    model.tie_weights()  # a tied output head is not in the file: it takes the loaded embedding
    state = model.state_dict()
    loaded = {state[k].data_ptr() for k in where if k in state}
    persistent = [k for k in state if not any(k.startswith(f"{n}.") for n in metas)]
    missing = [k for k in persistent if k not in where and state[k].data_ptr() not in loaded]
    if missing:
        raise ValueError(f"{root}: checkpoint does not fit {type(model).__name__}: missing {missing[:5]}")
    return model.eval()


# ----------------------------------------------------------------------------------------------
# storage by type, from the file headers
# ----------------------------------------------------------------------------------------------
def checkpoint_storage_report(path: str | os.PathLike[str]) -> dict[str, int]:
    """Bytes of a model directory's safetensors by storage type, reading only headers and the small
    quant-state entries.  Same keys as :func:`model_storage_report` (``"<quant_type>_packed"``,
    ``"quant_stats"`` incl. the 4-byte double-quant offset held in the JSON, one key per dtype,
    ``"params_4bit"``, ``"total"``) plus ``"quant_metadata"``: the JSON entries themselves."""
    from safetensors import safe_open

    report: dict[str, int] = {}
    entries: dict[str, tuple[str, int]] = {}  # key -> (dtype name, bytes)
    metas: dict[str, dict[str, Any]] = {}  # "<name>.weight" -> quant-state JSON
    for f in _safetensors_files(Path(path)):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = st.get_slice(key)
                dt = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                nbytes = math.prod(sl.get_shape()) * getattr(torch, dt, torch.uint8).itemsize
                entries[key] = (dt, nbytes)
                if _QUANT_STATE_TAG in key:
                    metas[key.split(_QUANT_STATE_TAG)[0]] = json.loads(bytes(st.get_tensor(key).numpy()))

    def add(k: str, n: int) -> None:
        report[k] = report.get(k, 0) + n

    for key, (dt, nbytes) in entries.items():
        stem, _, leaf = key.rpartition(".")
        if _QUANT_STATE_TAG in key:
            add("quant_metadata", nbytes)
        elif key in metas:
            add(f"{metas[key]['quant_type']}_packed", nbytes)
            add("params_4bit", math.prod(metas[key]["shape"]))
            add("quant_stats", 4 if "nested_offset" in metas[key] else 0)
        elif stem in metas and leaf in _STAT_LEAVES:
            add("quant_stats", nbytes)
        else:
            add(dt, nbytes)
    report["total"] = sum(v for k, v in report.items() if k != "params_4bit")
    return report


def format_storage_report(report: dict[str, int]) -> list[str]:
    """Lines for ``deltatune info``: one per storage type, then the bits per 4-bit weight."""
    lines = ["storage by type:"]
    for key, n in sorted(report.items(), key=lambda kv: -kv[1]):
        if key not in ("params_4bit", "total"):
            lines.append(f"  {key:<16}{n:>16,d} B")
    lines.append(f"  {'total':<16}{report.get('total', 0):>16,d} B ({report.get('total', 0) / 2**20:.1f} MiB)")
    n4 = report.get("params_4bit", 0)
    if n4:
        packed = sum(v for k, v in report.items() if k.endswith("_packed"))
        bits = 8 * (packed + report.get("quant_stats", 0)) / n4
        lines.append(f"  4-bit weights: {n4:,d} parameters at {bits:.3f} bits each (codes + block constants)")
    return lines


def describe_checkpoint(path: str | os.PathLike[str]) -> list[str]:
    """``deltatune info`` on a model directory: architecture, quantization, storage by type."""
    root = Path(path)
    cfg = json.loads((root / "config.json").read_text())
    lines = [f"model: {root}", f"architecture: {(cfg.get('architectures') or ['?'])[0]} ({cfg.get('model_type')})"]
    qc = cfg.get("quantization_config")
    if isinstance(qc, dict) and is_4bit_checkpoint(root):
        lines.append(f"quantization: bitsandbytes 4-bit {qc.get('bnb_4bit_quant_type')}, double quant "
                     f"{qc.get('bnb_4bit_use_double_quant')}, compute dtype {qc.get('bnb_4bit_compute_dtype')}, "
                     f"skip modules {qc.get('llm_int8_skip_modules') or 'default (output head)'}")
    elif isinstance(qc, dict):
        lines.append(f"quantization: {qc.get('quant_method')}")
    return lines + format_storage_report(checkpoint_storage_report(root))
