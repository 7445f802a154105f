"""Resumable training checkpoints: safetensors + JSON only (nothing is ever unpickled).

A checkpoint is a directory ``<run>/checkpoints/step-000123/`` holding
  trainable.safetensors   every trainable parameter, by its name in ``model.named_parameters()``
  optimizer.safetensors   the optimizer's tensor state, keys ``state.<param index>.<name>``
  state.json              optimizer scalars + param groups, scheduler state, progress, and each
                          hook's JSON state under "hooks" → name (its tensors are in
                          optimizer.safetensors as ``hook.<name>.<key>``; RNG states as ``rng.*``)
Checkpoints written before hooks existed kept AdaLoRA's allocator state under "method" and
``method.<key>``; they load into the hook named ``adalora_ranks``.
It is written to a temp directory and renamed into place, so a checkpoint is whole or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..fsutil import fix_modes, fsync_tree

if TYPE_CHECKING:
    from .hooks import Hook

_LEGACY_HOOK = "adalora_ranks"  # the one stateful method before hooks (state.json "method")

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
                    scheduler: Any, progress: dict[str, Any], hooks: Sequence[Hook] = (), keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep``, with every hook's
    ``state_dict()`` ({"tensors": {...}, **json})."""
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
        hook_meta: dict[str, Any] = {}
        for h in hooks:
            hs = dict(h.state_dict())
            for k, t in hs.pop("tensors", {}).items():
                opt_tensors[f"hook.{h.name}.{k}"] = t.detach().contiguous().cpu()
            hook_meta[h.name] = hs
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(), "progress": progress,
                 "hooks": hook_meta}
        (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        fix_modes(tmp)  # mkdtemp 0700, safetensors 0600 → what open/mkdir give under the umask
        fsync_tree(tmp)  # the data is on disk before the rename makes the checkpoint visible
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError | SafetensorError):  # a full disk: say which checkpoint, keep the others
            reason = getattr(e, "strerror", None) or str(e)
            raise OSError(getattr(e, "errno", None) or 5, f"writing the checkpoint failed: {reason}; the previous "
                          "checkpoints are kept", str(final)) from e
        raise
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_hooks(path: Path, hooks: Sequence[Hook], state: dict[str, Any], opt_tensors: dict[str, torch.Tensor]) -> None:
    """Give every hook its saved state (popping its tensors from ``opt_tensors``)."""
    metas: dict[str, Any] = dict(state.get("hooks") or {})
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key in [k for k in opt_tensors if k.startswith(("hook.", "method."))]:
        if key.startswith("method."):  # the pre-hook layout
            name, sub = _LEGACY_HOOK, key[len("method."):]
        else:
            name, sub = key[len("hook."):].split(".", 1)
        tensors.setdefault(name, {})[sub] = opt_tensors.pop(key)
    if state.get("method") is not None:
        metas[_LEGACY_HOOK] = state["method"]
    names = {h.name for h in hooks}
    if set(metas) - names:
        raise ValueError(f"{path}: the checkpoint holds state of hooks {sorted(set(metas) - names)} that this run "
                         f"does not have (it has {sorted(names)}); resume with the same config")
    for h in hooks:
        if h.name in metas:
            h.load_state_dict({"tensors": tensors.get(h.name, {}), **metas[h.name]})


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
                    hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Restore parameters, optimizer, scheduler, hook states and RNG; return the saved progress dict."""
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
    _load_hooks(path, hooks, state, opt_tensors)
    rng = opt_tensors.pop("rng.torch")
    cuda = {k: opt_tensors.pop(k) for k in [k for k in opt_tensors if k.startswith("rng.cuda")]}
    optimizer.load_state_dict(_unflatten_optimizer(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda[f"rng.cuda{i}"] for i in range(len(cuda))])
    progress: dict[str, Any] = state["progress"]
    return progress
