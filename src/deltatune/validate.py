"""One validation layer for numbers and ranges, shared by config dataclasses and CLI flags.

Every check names the key (``train.lr``, ``--top-p``) and says what was expected, e.g.
``train.eps must be a finite number > 0, got inf``. Config sections call :func:`number` from
``__post_init__`` (so the Python API is checked too, not only YAML); ``argparse`` flags use
:func:`flag` as their ``type=``. Non-finite values (NaN, ±inf) are refused everywhere: no setting
of deltatune means anything at infinity, and NaN compares false with every bound, so a range
check written as ``if not x > 0`` would otherwise let it through.

Also the adapter/tensor checks that refuse NaN weights or integer tensors before they reach a
model (:func:`check_tensors`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["number", "numbers", "flag", "expectation", "check_tensors", "is_finite_number"]


def is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def expectation(*, integer: bool = False, gt: float | None = None, ge: float | None = None,
                lt: float | None = None, le: float | None = None) -> str:
    """'an integer >= 1', 'a finite number in (0, 1]', …: the phrase after 'must be'."""
    kind = "an integer" if integer else "a finite number"
    lo = (f"({gt:g}" if gt is not None else f"[{ge:g}" if ge is not None else None)
    hi = (f"{lt:g})" if lt is not None else f"{le:g}]" if le is not None else None)
    if lo and hi:
        return f"{kind} in {lo}, {hi}"
    if gt is not None:
        return f"{kind} > {gt:g}"
    if ge is not None:
        return f"{kind} >= {ge:g}"
    if lt is not None:
        return f"{kind} < {lt:g}"
    if le is not None:
        return f"{kind} <= {le:g}"
    return kind


def _problem(value: Any, integer: bool, gt: float | None, ge: float | None, lt: float | None,
             le: float | None) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return True
    if integer and not isinstance(value, int):
        return True
    if not math.isfinite(value):
        return True
    return ((gt is not None and not value > gt) or (ge is not None and not value >= ge)
            or (lt is not None and not value < lt) or (le is not None and not value <= le))


def number(key: str, value: Any, *, integer: bool = False, gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None, hint: str = "") -> Any:
    """Return ``value`` if it is a finite number (an int when ``integer``) within the bounds, else
    raise ``ValueError('<key> must be <expectation>, got <value>[; hint]')``."""
    if _problem(value, integer, gt, ge, lt, le):
        what = expectation(integer=integer, gt=gt, ge=ge, lt=lt, le=le)
        raise ValueError(f"{key} must be {what}, got {value!r}" + (f"; {hint}" if hint else ""))
    return value


def numbers(key: str, values: Mapping[str, Any], **bounds: Any) -> None:
    """:func:`number` for each value of a mapping (``lora.rank_pattern``): the message names the entry."""
    for k, v in values.items():
        number(f"{key}[{k!r}]", v, **bounds)


def flag(kind: type, **bounds: Any) -> Callable[[str], Any]:
    """An ``argparse`` ``type=`` that parses ``int``/``float`` and applies :func:`number`'s bounds:
    argparse then reports ``argument --top-p: must be a finite number in [0, 1], got 5.0``."""
    integer = kind is int

    def parse(text: str) -> Any:
        what = expectation(integer=integer, **bounds)
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if _problem(value, integer, bounds.get("gt"), bounds.get("ge"), bounds.get("lt"), bounds.get("le")):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse's "invalid int value" wording for non-ArgumentTypeError
    return parse


def check_tensors(tensors: Mapping[str, Any], where: str, *, allow_int: tuple[str, ...] = ()) -> None:
    """Refuse tensors that would silently corrupt a model: a non-float dtype (an int32 LoRA factor is
    cast without a word) or a NaN/inf value (it merges into a NaN model). ``allow_int`` lists key
    suffixes that are integer by design (e.g. AdaLoRA's rank pattern). Names the first bad key."""
    import torch

    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            continue
        if not t.is_floating_point():
            if key.endswith(allow_int):
                continue
            raise ValueError(f"{where}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                             "adapter weights must be floating point (float32/bfloat16/float16)")
        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: tensor {key!r} holds {bad} non-finite value(s) (NaN/inf) of {t.numel()}; "
                             "the adapter is corrupt or its training diverged")


def finite_fields(obj: Any, section: str) -> None:
    """Refuse NaN/±inf in any float field (or tuple of floats) of the dataclass ``obj``: the Python-API
    twin of the config loader's float check, for sections built directly (``LoopConfig(eps=inf)``)."""
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, tuple | list) else (value,)
        for v in items:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{section}.{f.name} must be finite, got {value!r}")
