"""Resumable training checkpoints: safetensors + JSON only (nothing is ever unpickled).

A checkpoint is a directory ``<run>/checkpoints/step-000123/`` holding
  trainable.safetensors   every trainable parameter, by its name in ``model.named_parameters()``
  optimizer.safetensors   the optimizer's tensor state, keys ``state.<param index>.<name>``
  state.json              optimizer scalars + param groups, scheduler state, progress, RNG seeds
It is written to a temp directory and renamed into place, so a checkpoint is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..fsutil import default_mode, fsync_tree

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for idx, scalars in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, progress: dict[str, Any], method_state: Any = None, keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``. ``method_state`` is an
    object with ``state_dict()`` → {"tensors": {...}, **json} (AdaLoRA's allocator), or None."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    try:
        params = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(params, str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        opt_tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                opt_tensors[f"rng.cuda{i}"] = s
        method_meta = None
        if method_state is not None:
            ms = dict(method_state.state_dict())
            for k, t in ms.pop("tensors", {}).items():
                opt_tensors[f"method.{k}"] = t.detach().contiguous().cpu()
            method_meta = ms
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "progress": progress,
                 "method": method_meta}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        os.chmod(tmp, default_mode(directory=True))  # mkdtemp's 0700 → what mkdir gives under the umask
        fsync_tree(tmp)  # the data is on disk before the rename makes the checkpoint visible
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | SafetensorError):  # a full disk: say which checkpoint, keep the others
            raise OSError(getattr(e, "errno", None) or 5, f"{final}: writing the checkpoint failed ({e}); "
                          "the previous checkpoints are kept") from e
        raise
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"cannot store {type(o).__name__} in a checkpoint's state.json")


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    method_state: Any = None) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler and RNG; return the saved progress dict."""
    try:
        params = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated file
        raise ValueError(f"{path}: checkpoint cannot be read ({e}); delete it to resume from the one before") from e
    named = dict(model.named_parameters())
    missing = [n for n in params if n not in named]
    trainable = [n for n, p in named.items() if p.requires_grad]
    if missing or sorted(trainable) != sorted(params):
        raise ValueError(
            f"{path}: the checkpoint's trainable parameters do not match this model/method "
            f"(e.g. {(missing or sorted(set(trainable) ^ set(params)))[:3]}); resume with the same config"
        )
    with torch.no_grad():
        for n, t in params.items():
            named[n].copy_(t)
    method_tensors = {k[len("method."):]: opt_tensors.pop(k) for k in [k for k in opt_tensors if k.startswith("method.")]}
    if method_state is not None and state.get("method") is not None:
        method_state.load_state_dict({"tensors": method_tensors, **state["method"]})
    rng = opt_tensors.pop("rng.torch")
    cuda = {k: opt_tensors.pop(k) for k in [k for k in opt_tensors if k.startswith("rng.cuda")]}
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[f"rng.cuda{i}"] for i in range(len(cuda))])
    progress: dict[str, Any] = state["progress"]
    return progress
