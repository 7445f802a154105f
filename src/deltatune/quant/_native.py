"""Optional native CPU kernel for 4-bit dequantize, built at first use with the system C compiler.

Eager PyTorch needs two full passes to dequantize (a codebook lookup, then the multiply by the
block absmax) and ends at ~1.8x the time of merely writing the output; bitsandbytes' C++ kernel is
at ~1.1x.  ``csrc/dequant4bit.c`` does it in one pass (register table lookups, AVX-512 / AVX2 /
SSSE3 chosen at run time, plain C elsewhere) with the same arithmetic, so its results are bit-identical to the
pure-PyTorch path, which stays the fallback and the device-agnostic reference.

Why ctypes and not a torch C++ extension: the file has no torch headers, so it compiles in well
under a second (a torch extension takes a minute on two cores), and the shared object does not
depend on the torch ABI.  The library is cached under ``$DELTATUNE_CACHE/native/<hash>/``
(hash of source, compiler command and platform) and written atomically, so concurrent processes
never load a half-written file.

``DELTATUNE_NATIVE=0`` disables it; ``CC`` picks the compiler (default ``cc``).  Any failure
(no compiler, compile error, load error) logs one warning and falls back to PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..paths import cache_root

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("csrc") / "dequant4bit.c"
# -O2 leaves it 2x slower (measured); no contraction into FMA, which would change the bits.
_FLAGS = ("-O3", "-std=c11", "-ffp-contract=off", "-fPIC", "-shared", "-pthread")
# Output dtype -> the kernel's `kind` argument.
KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_lock = threading.Lock()
_state: dict[str, object] = {}  # "fn": the ctypes function or None once tried


def enabled() -> bool:
    return os.environ.get("DELTATUNE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    return cache_root() / "native"


def _build(cc: str) -> Path:
    """Compile the kernel (or reuse the cached build) and return the shared object's path."""
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(
        src + repr((cc, _FLAGS, platform.machine(), platform.system())).encode()
    ).hexdigest()[:16]
    lib = _cache_dir() / key / "libdeltatune_quant.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=lib.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {_SOURCE} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: another process sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def dequant_kernel() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """The compiled ``deltatune_dequant4bit`` function, or None (disabled or unavailable)."""
    if not enabled():
        return None
    with _lock:
        if "fn" in _state:
            return _state["fn"]  # type: ignore[return-value]
        fn = None
        cc = os.environ.get("CC") or "cc"
        try:
            if shutil.which(cc) is None:
                raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC to use another)")
            lib = ctypes.CDLL(str(_build(cc)))  # CDLL releases the GIL during calls
            fn = lib.deltatune_dequant4bit
            # (pk, absmax, nested_code, nested_absmax, offset, nested_bs, code, out,
            #  nblocks, bs, kind, nthreads): see deltatune_dequant4bit in the C file.
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            fn.argtypes = [p, p, p, p, ctypes.c_float, i64, p, p, i64, i64, i32, i32]
            fn.restype = ctypes.c_int
            fn.set_max_isa = lib.deltatune_set_max_isa  # type: ignore[attr-defined]  # tests
            fn.set_max_isa.argtypes = [ctypes.c_int]  # type: ignore[attr-defined]
            fn.set_max_isa.restype = ctypes.c_int  # type: ignore[attr-defined]
        except Exception as e:  # any failure means: use the PyTorch path
            log.warning(
                "deltatune: native 4-bit dequantize kernel unavailable, dequantizing in PyTorch (slower): %s", e
            )
            fn = None
        _state["fn"] = fn
        return fn


def reset() -> None:
    """Forget the loaded kernel (tests: re-read DELTATUNE_NATIVE / CC on the next call)."""
    with _lock:
        _state.clear()
