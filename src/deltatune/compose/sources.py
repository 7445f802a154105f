"""Adapters in, adapter out: reading adapter directories (LoRA, VeRA, AdaLoRA; PEFT layout) or a
loaded model's adapters as plain LoRA factors, and writing a composed adapter in PEFT's layout.

Conversions to plain factors ΔW = s·B@A (all exact):
  LoRA      A, B as stored; s = α/r or α/√r (rsLoRA), per module with rank/alpha patterns
  PiSSA     deltatune and PEFT's converted files are already plain LoRA relative to the original
            base (rank 2r); an unconverted file (ΔW relative to a residual base) is refused
  VeRA      A' = Λ_d·A[:, :k] (r, k), B' = Λ_b·B[:d] (d, r), s = 1, with the file's projections
            (or those regenerated from its seed); different seeds are fine: each keeps its own
  AdaLoRA   A' = Λ⊙Q (r, k), B' = P (d, r), s = α/(init_r + 1e-5) (PEFT's scale)
Refused, naming adapter and module: DoRA magnitudes (m·V/‖V‖ is not linear in ΔW), trained
biases (bias='all'/'lora_only', lora_bias), modules_to_save copies.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .combine import AdapterFactors, Composed, CompositionError, ModuleFactors

__all__ = ["read_adapter", "from_model", "save_composed"]

_PREFIX = "base_model.model."


def _pattern(patterns: dict[str, Any], path: str) -> Any:
    # PEFT's get_pattern_key: the pattern must match a dotted suffix of the module path.
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", path):
            return value
    return None


def _body(key: str) -> str:
    return key[len(_PREFIX):] if key.startswith(_PREFIX) else key


def read_adapter(path: str | Path, *, name: str | None = None,
                 shapes: dict[str, tuple[int, int]] | None = None) -> AdapterFactors:
    """An adapter directory as plain LoRA factors. ``shapes`` (module path → (k, d)) is only needed for
    a VeRA file without deltatune's fingerprint (PEFT's files do not record the layer widths)."""
    from ..io import read_adapter_info

    f = read_adapter_info(path)
    who = name or str(path)
    c = f.config
    peft_type = str(c.get("peft_type", "LORA"))
    if c.get("modules_to_save"):
        raise CompositionError(f"adapter {who!r} trains full copies of {c['modules_to_save']} (modules_to_save); "
                               "copies of whole modules have no weighted combination; retrain without them")
    if c.get("bias", "none") != "none" or c.get("lora_bias"):
        raise CompositionError(f"adapter {who!r} trains biases (bias={c.get('bias')!r}, lora_bias={c.get('lora_bias')}); "
                               "trained biases replace the base's and do not combine as a weighted ΔW")
    if peft_type == "LORA":
        modules = _lora_modules(f.tensors, c, who)
    elif peft_type == "VERA":
        modules = _vera_modules(f.tensors, c, who, shapes or _fp_shapes(f.fingerprint))
    elif peft_type == "ADALORA":
        modules = _adalora_modules(f.tensors, c, who)
    else:
        raise CompositionError(f"adapter {who!r}: peft_type {peft_type!r} is not a weight delta of low rank; "
                               "only LoRA (incl. PiSSA/OLoRA-converted), VeRA and AdaLoRA adapters compose")
    if not modules:
        raise CompositionError(f"adapter {who!r}: no adapted modules found in {path}")
    # A file's key order is not the model's; a fixed (natural) order makes DARE draws reproducible.
    modules = dict(sorted(modules.items(), key=lambda kv: _natural(kv[0])))
    return AdapterFactors(who, modules, f.fingerprint, c.get("base_model_name_or_path"), c.get("task_type"))


def _natural(path: str) -> list[tuple[int, int | str]]:
    """'layers.10.q' after 'layers.2.q': digit runs compare as numbers."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", path)]


def _fp_shapes(fp: dict[str, Any] | None) -> dict[str, tuple[int, int]]:
    return {p: (int(i["shape"][0]), int(i["shape"][1])) for p, i in ((fp or {}).get("modules") or {}).items()}


def _lora_modules(tensors: dict[str, torch.Tensor], c: dict[str, Any], who: str) -> dict[str, ModuleFactors]:
    init = c.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in ("gaussian", "true") and not c.get("deltatune_init"):
        raise CompositionError(
            f"adapter {who!r} was saved with init_lora_weights={init!r} unconverted: its ΔW is relative to a "
            "residual base, not to the shared one; save it converted (deltatune does; PEFT: "
            "path_initial_model_for_weight_conversion) and compose that")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = _body(key)
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "A"),
                             (".lora_embedding_B", "B"), (".lora_magnitude_vector", "m"),
                             (".lora_magnitude_vector.weight", "m"), (".lora_B.bias", "bias")):
            if body.endswith(suffix):
                parts.setdefault(body[: -len(suffix)], {})[part + ("e" if "embedding" in suffix else "")] = t
                break
    r0, a0 = int(c.get("r", 8)), float(c.get("lora_alpha", 8))
    rs = bool(c.get("use_rslora", False))
    conv1d = bool(c.get("fan_in_fan_out", False))
    out: dict[str, ModuleFactors] = {}
    for path, p in sorted(parts.items()):  # file order varies with the writer; errors name the first module
        if "m" in p or c.get("use_dora"):
            raise CompositionError(f"adapter {who!r}, module {path!r}: a DoRA magnitude m·(W₀+ΔW)/‖W₀+ΔW‖ is not "
                                   "linear in ΔW, so DoRA adapters have no weighted combination")
        if "bias" in p:
            raise CompositionError(f"adapter {who!r}, module {path!r}: lora_bias is a trained bias, not a ΔW; "
                                   "it does not combine")
        a, b = p.get("A", p.get("Ae")), p.get("B", p.get("Be"))
        if a is None or b is None:
            raise CompositionError(f"adapter {who!r}, module {path!r}: lacks its lora_{'B' if a is not None else 'A'}")
        r = int(a.shape[0])
        r_cfg = int(_pattern(c.get("rank_pattern") or {}, path) or r0)
        if r != r_cfg:
            raise CompositionError(f"adapter {who!r}, module {path!r}: rank {r} in the file but the config says {r_cfg}")
        alpha = float(_pattern(c.get("alpha_pattern") or {}, path) or a0)
        kind = "embedding" if "Ae" in p else "conv2d" if a.dim() == 4 else "conv1d" if conv1d else "linear"
        out[path] = ModuleFactors(kind, a, b, alpha / math.sqrt(r) if rs else alpha / r)
    return out


def _vera_modules(tensors: dict[str, torch.Tensor], c: dict[str, Any], who: str,
                  shapes: dict[str, tuple[int, int]]) -> dict[str, ModuleFactors]:
    from ..methods.vera import VeraProjections

    vecs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix in (".vera_lambda_b", ".vera_lambda_d"):
            if _body(key).endswith(suffix):
                vecs.setdefault(_body(key)[: -len(suffix)], {})[suffix[-1]] = t
    missing = [p for p in vecs if p not in shapes]
    if missing:
        raise CompositionError(f"adapter {who!r}, module {missing[0]!r}: a VeRA file without deltatune's fingerprint "
                               "does not record the layer widths; pass the base model (--model) to compose it")
    r = int(c.get("r", 256))
    if "base_model.vera_A" in tensors:
        big_a, big_b = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
    else:  # regenerated from the seed, over the widest adapted layers (as the layer code does)
        proj = VeraProjections(r, max(shapes[p][0] for p in vecs), max(shapes[p][1] for p in vecs),
                               int(c.get("projection_prng_key", 0)))
        big_a, big_b = proj.A, proj.B
    kind = "conv1d" if c.get("fan_in_fan_out") else "linear"
    out = {}
    for path, v in vecs.items():
        k, d = shapes[path]
        a = v["d"].float()[:, None] * big_a[:, :k].float()  # Λ_d·A (r, k)
        b = v["b"].float()[:, None] * big_b[:d].float()  # Λ_b·B (d, r)
        out[path] = ModuleFactors(kind, a, b, 1.0)
    return out


def _adalora_modules(tensors: dict[str, torch.Tensor], c: dict[str, Any], who: str) -> dict[str, ModuleFactors]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        mpath, _, part = _body(key).rpartition(".")
        parts.setdefault(mpath, {})[part] = t
    alpha, init_r = float(c.get("lora_alpha", 8)), int(c.get("init_r", 12))
    kind = "conv1d" if c.get("fan_in_fan_out") else "linear"
    out = {}
    for path, p in parts.items():
        if not {"lora_A", "lora_B", "lora_E"} <= set(p):
            raise CompositionError(f"adapter {who!r}, module {path!r}: an AdaLoRA module needs lora_A, lora_B, lora_E")
        r = int(p["lora_A"].shape[0])
        scale = (alpha if alpha > 0 else float(r)) / (init_r + 1e-5)
        out[path] = ModuleFactors(kind, p["lora_A"].float() * p["lora_E"].float(), p["lora_B"].float(), scale)
    return out


def from_model(model: nn.Module, name: str) -> AdapterFactors:
    """Adapter ``name`` of a deltatune model as plain LoRA factors (module order = model order)."""
    from ..inject import get_state, lora_layers
    from ..io import fingerprint
    from ..methods import dora, lora_init

    state = get_state(model)
    if name not in state.configs:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(state.configs)}")
    cfg = state.configs[name]
    kind_name = type(cfg).__name__
    modules: dict[str, ModuleFactors] = {}
    if kind_name == "VeraConfig":
        from ..methods.vera import vera_layers

        for path, vl in vera_layers(model):
            a, b = vl.slices()
            lam_d, lam_b = vl.vectors()
            modules[path] = ModuleFactors(vl.kind, (lam_d[:, None] * a).detach().float(),
                                          (lam_b[:, None] * b).detach().float(), 1.0)
    elif kind_name == "AdaLoraConfig":
        from ..methods.adalora import adalora_layers

        for path, al in adalora_layers(model):
            qa, pb, e = (t.detach().float() for t in al.factors())
            modules[path] = ModuleFactors(al.kind, qa * e, pb, al.scale)
    elif kind_name == "LoraConfig":
        if getattr(cfg, "bias", "none") != "none" or getattr(cfg, "modules_to_save", None):
            raise CompositionError(f"adapter {name!r} trains biases or modules_to_save copies; they do not combine")
        for path, layer in lora_layers(model):
            if name not in layer.adapters:
                continue
            if isinstance(layer, dora.DoraLayer) and layer.is_dora(name):
                raise CompositionError(f"adapter {name!r}, module {path!r}: a DoRA magnitude m·(W₀+ΔW)/‖W₀+ΔW‖ is "
                                       "not linear in ΔW, so DoRA adapters have no weighted combination")
            a, b = lora_init.saved_factors(layer, name)  # PiSSA/OLoRA: relative to the original base
            modules[path] = ModuleFactors(layer.kind, a.detach(), b.detach(), layer.adapters[name].scale)
    else:
        raise CompositionError(f"adapter {name!r} is a {kind_name} adapter, not a low-rank weight delta; "
                               "only LoRA, VeRA and AdaLoRA adapters compose")
    cfg_model = getattr(model, "config", None)
    task = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    return AdapterFactors(name, modules, fingerprint(model, list(modules)),
                          getattr(cfg_model, "_name_or_path", None) or None, task)


def peft_config(composed: Composed) -> dict[str, Any]:
    """PEFT LoraConfig fields for the composed adapter: every module at scale 1 (alpha = r)."""
    ranks = {p: m.rank for p, m in composed.modules.items()}
    r = max(ranks.values())
    kinds = {m.kind for m in composed.modules.values()}
    return {
        "peft_type": "LORA", "task_type": composed.task_type,
        "base_model_name_or_path": composed.base_model_name_or_path, "revision": None, "inference_mode": True,
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": sorted(ranks), "exclude_modules": None,
        "bias": "none", "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): float(v) for p, v in ranks.items() if v != r},
        "fan_in_fan_out": "conv1d" in kinds and "linear" not in kinds, "use_dora": False,
    }


def save_composed(composed: Composed, out: str | Path, *, inputs: list[str | Path] = (),  # type: ignore[assignment]
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write ``composed`` as a PEFT LoRA directory, atomically: into a temp directory next to ``out``,
    then renamed into place. Refuses to write over (or inside) any of ``inputs``."""
    from safetensors.torch import save

    out = Path(out)
    target = out.resolve()
    for d in inputs:
        src = Path(d).resolve()
        if target == src or src in target.parents or target in src.parents:
            raise ValueError(f"--out {out} would overwrite input adapter {d}; write the result elsewhere")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "adapter_config.json").is_file())):
        raise ValueError(f"--out {out} exists and is not an adapter directory; refusing to replace it")
    tensors: dict[str, torch.Tensor] = {}
    for path, m in composed.modules.items():
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding"
                        else ("lora_A.weight", "lora_B.weight"))
        tensors[f"{_PREFIX}{path}.{a_key}"] = m.a.detach().to(dtype).contiguous().cpu().clone()
        tensors[f"{_PREFIX}{path}.{b_key}"] = m.b.detach().to(dtype).contiguous().cpu().clone()
    meta = {"format": "pt", "deltatune_init": "kaiming",
            "deltatune_composition": json.dumps({"method": composed.method, "weights": composed.weights,
                                                 "sources": composed.sources, "settings": composed.settings,
                                                 "energy": composed.energy})}
    if composed.fingerprint:
        meta["deltatune_fingerprint"] = json.dumps(composed.fingerprint)
    from ..fsutil import atomic_dir

    # temp dir + fsync + rename, modes per the umask (mkdtemp alone made the adapter dir 0700)
    with atomic_dir(out, replaceable=lambda p: (p / "adapter_config.json").is_file(), what="adapter directory") as tmp:
        (tmp / "adapter_model.safetensors").write_bytes(save(tensors, metadata=meta))
        (tmp / "adapter_config.json").write_text(json.dumps(peft_config(composed), indent=2, sort_keys=True) + "\n")
    return out
