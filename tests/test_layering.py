"""Layering (ARCHITECTURE.md): storage (quant/) never imports training or data; modules that once
imported each other in a circle (bottleneck ↔ registry, models ↔ quant._native) import on their own."""

from __future__ import annotations

import subprocess
import sys


def _fresh(code: str) -> None:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_quant_imports_no_training_or_data() -> None:
    _fresh("import sys, deltatune.quant._native, deltatune.quant, deltatune.quant.merge, deltatune.quant.checkpoint\n"
           "bad = sorted(m for m in sys.modules if m.startswith(('deltatune.train', 'deltatune.data', "
           "'deltatune.objectives', 'deltatune.registry', 'deltatune.models')))\n"
           "assert not bad, bad")


def test_formerly_circular_modules_import_first() -> None:
    _fresh("import deltatune.methods.bottleneck, deltatune.structure, deltatune.registry, deltatune.train.config")
