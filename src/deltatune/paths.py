"""Where deltatune keeps files between runs (below models/ and quant/, importing neither)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")
