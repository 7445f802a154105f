"""What an adapter directory holds, per adapter kind: the lines ``deltatune info`` prints.

Each function takes a parsed :class:`~deltatune.io.AdapterFile` and returns the method line plus
the adapted modules (``registry.ADAPTERS[...].describe`` points here)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .io import AdapterFile

__all__ = ["describe_lora", "describe_vera", "describe_adalora", "describe_bottleneck", "describe_prompts"]

_PREFIX = "base_model.model."


def _modules(f: AdapterFile, tags: dict[str, bool]) -> dict[str, dict[str, int]]:
    """Tensors grouped by module path: tensor keys ``<prefix><path><tag>``; a tag mapped to True
    gives the rank as its tensor's first dimension."""
    out: dict[str, dict[str, int]] = {}
    for key, t in f.tensors.items():
        body = key.removeprefix(_PREFIX)
        for tag, has_rank in tags.items():
            if body.endswith(tag):
                info = out.setdefault(body[: -len(tag)], {"params": 0})
                info["params"] += t.numel()
                if has_rank:
                    info["rank"] = int(t.shape[0])
    return out


def _module_lines(modules: dict[str, dict[str, int]], what: str = "r") -> list[str]:
    ranks: dict[int, int] = {}
    for info in modules.values():
        ranks[info.get("rank", 0)] = ranks.get(info.get("rank", 0), 0) + 1
    lines = [f"adapted modules: {len(modules)}; ranks: {dict(sorted(ranks.items()))}"]
    for name, info in list(modules.items())[:8]:
        lines.append(f"  {name}: {what}={info.get('rank')} params={info['params']:,d}")
    if len(modules) > 8:
        lines.append(f"  … {len(modules) - 8} more")
    return lines


def describe_lora(f: AdapterFile) -> list[str]:
    c = f.config
    tags = {".lora_A.weight": True, ".lora_B.weight": False, ".lora_embedding_A": True, ".lora_embedding_B": False,
            ".lora_magnitude_vector": False, ".lora_magnitude_vector.weight": False}
    head = (f"method: {c.get('peft_type', 'LORA')}{' (DoRA)' if c.get('use_dora') else ''}  r={c.get('r')}  "
            f"alpha={c.get('lora_alpha')}  rslora={c.get('use_rslora', False)}  dropout={c.get('lora_dropout', 0)}  "
            f"bias={c.get('bias')}")
    return [head, *_module_lines(_modules(f, tags))]


def describe_vera(f: AdapterFile) -> list[str]:
    c = f.config
    shared = "saved" if any(k.endswith(("vera_A", "vera_B")) for k in f.tensors) else \
        f"regenerated from projection_prng_key={c.get('projection_prng_key')}"
    head = f"method: VERA  r={c.get('r')}  shared A, B: {shared}"
    # Per layer: λ_d (r,) and λ_b (d_out,): the rank is λ_d's length.
    return [head, *_module_lines(_modules(f, {".vera_lambda_d": True, ".vera_lambda_b": False}))]


def describe_adalora(f: AdapterFile) -> list[str]:
    c = f.config
    head = (f"method: ADALORA  init_r={c.get('init_r')}  target_r={c.get('target_r')}  total_step={c.get('total_step')}  "
            f"alpha={c.get('lora_alpha')}")
    # Pruned triplets are cut out of the file: lora_A's rows are the kept rank of each layer.
    return [head, *_module_lines(_modules(f, {".lora_A": True, ".lora_B": False, ".lora_E": False}))]


def describe_bottleneck(f: AdapterFile) -> list[str]:
    c = f.config
    head = (f"method: BOTTLENECK (deltatune format {c.get('format_version')})  r={c.get('r')}  "
            f"placement={c.get('placement')}  activation={c.get('activation')}")
    tags = {".down.weight": True, ".down.bias": False, ".up.weight": False, ".up.bias": False}
    return [head, *_module_lines(_modules(f, tags))]


def describe_prompts(f: AdapterFile) -> list[str]:
    c: dict[str, Any] = f.config
    emb = f.tensors.get("prompt_embeddings")
    shape = list(emb.shape) if emb is not None else None
    where = ("the input embeddings" if c.get("peft_type") == "PROMPT_TUNING"
             else f"keys/values of {c.get('num_layers')} layers")
    return [f"method: {c.get('peft_type')}  virtual tokens: {c.get('num_virtual_tokens')}  "
            f"prompt_embeddings: {shape} ({where})",
            f"adapted modules: 1 (the prompt seam); virtual tokens: {c.get('num_virtual_tokens')}"]
