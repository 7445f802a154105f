"""Combinations of adapters that share a base (MISSION §7): ΔW = Σᵢ λᵢ sᵢ BᵢAᵢ exactly, PEFT's
``add_weighted_adapter`` types with PEFT's semantics, task arithmetic, TIES/DARE/DELLA/breadcrumbs.

  combine(adapters, weights, method, …) -> Composed     pure, over plain LoRA factors (combine.py)
  read_adapter(dir) / from_model(model, name)            adapters as factors (sources.py)
  save_composed(composed, dir)                           a PEFT-format LoRA directory, atomically
  set_weighted / add_weighted_adapter / merge_weighted   on a loaded model (model.py)
"""

from .combine import METHODS, AdapterFactors, Composed, CompositionError, ModuleFactors, combine
from .model import add_weighted_adapter, load_composed, merge_weighted, set_weighted
from .sources import from_model, peft_config, read_adapter, save_composed

__all__ = ["METHODS", "AdapterFactors", "Composed", "CompositionError", "ModuleFactors", "combine",
           "add_weighted_adapter", "load_composed", "merge_weighted", "set_weighted", "from_model", "peft_config",
           "read_adapter", "save_composed", "format_report"]


def format_report(composed: Composed) -> list[str]:
    """One line per module: its rank and the fraction of ‖ΔW‖² the SVD truncation kept."""
    lines = [f"{'module':<60} {'rank':>5} {'energy kept':>12}"]
    for path, m in composed.modules.items():
        e = composed.energy.get(path)
        lines.append(f"{path:<60} {m.rank:>5} {f'{e:.6f}' if e is not None else 'n/a (factor-wise)':>12}")
    kept = [e for e in composed.energy.values() if e is not None]
    if kept:
        lines.append(f"{len(composed.modules)} modules, energy kept: min {min(kept):.6f}, mean {sum(kept) / len(kept):.6f}")
    return lines
