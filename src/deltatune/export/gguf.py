"""GGUF export for llama.cpp and everything built on it: a merged model, or a LoRA adapter.

Tensor names come from gguf-py's own HF → GGUF table (``gguf.get_tensor_name_map``, the table
llama.cpp's ``convert_hf_to_gguf.py`` uses): ``model.layers.3.self_attn.q_proj`` → ``blk.3.attn_q``,
``model.embed_tokens`` → ``token_embd``, ``lm_head`` → ``output``.

The Llama q/k row permutation: HF checkpoints store each attention head's rotary pairs as two
halves (``rotate_half``), llama.cpp's RoPE kernel wants them interleaved, so ``convert_hf_to_gguf``
permutes the rows of ``q_proj`` (n_head heads) and ``k_proj`` (n_head_kv heads)::

    W.reshape(n_head, 2, d_head // 2, k).swapaxes(1, 2).reshape(d, k)

For a LoRA adapter ΔW = s·B·A only the rows of B are permuted (A acts on the input side).

Adapter files follow ``convert_lora_to_gguf.py``: ``general.type = adapter``, ``adapter.type =
lora``, ``adapter.lora.alpha``, and ``<gguf tensor name>.weight.lora_a`` (r, k) /
``.lora_b`` (d, r). llama.cpp scales each tensor pair by alpha / r with r read off the tensor, so
rsLoRA (s = α/√r), ``alpha_pattern`` and ``rank_pattern`` are folded: one alpha is written and
any module whose own scale differs has the ratio multiplied into its B.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["OUT_TYPES", "export_adapter_gguf", "export_model_gguf", "gguf_tensor_names", "permute_qk"]

OUT_TYPES = ("f32", "f16", "q8_0")
_ARCHS = {"llama": "LLAMA", "mistral": "LLAMA"}  # model_type → gguf MODEL_ARCH (Mistral is llama in llama.cpp)
_PREFIX = "base_model.model."


class GGUFExportError(ValueError):
    """The model or adapter holds something the GGUF format (or this exporter) cannot express."""


def _arch(config: Any) -> Any:
    import gguf

    mtype = getattr(config, "model_type", None)
    if mtype not in _ARCHS:
        raise GGUFExportError(f"GGUF export supports Llama-family models ({sorted(_ARCHS)}); this is {mtype!r}")
    return getattr(gguf.MODEL_ARCH, _ARCHS[mtype])


def _heads(config: Any) -> tuple[int, int]:
    n_head = int(config.num_attention_heads)
    return n_head, int(getattr(config, "num_key_value_heads", None) or n_head)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of the (d, …) rows of q_proj/k_proj (or of LoRA's B)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensor_names(config: Any, hf_names: list[str]) -> dict[str, str]:
    """HF module path (no '.weight') → GGUF tensor base name, from gguf-py's table."""
    import gguf

    table = gguf.get_tensor_name_map(_arch(config), int(config.num_hidden_layers))
    out: dict[str, str] = {}
    for name in hf_names:
        gname = table.get_name(name)
        if gname is None:
            raise GGUFExportError(f"no GGUF tensor name for {name!r} (gguf-py's {_ARCHS[config.model_type]} table)")
        out[name] = gname
    return out


def _permute_for(gname: str, config: Any) -> int | None:
    n_head, n_kv = _heads(config)
    if gname.endswith(".attn_q"):
        return n_head
    if gname.endswith(".attn_k"):
        return n_kv
    return None


def _atomic_gguf(out: Path, fill: Any, arch_name: str) -> Path:
    """Write a GGUF file through a temp file in the same directory + rename (never half a file)."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch_name)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        from ..fsutil import default_mode

        os.chmod(tmp, default_mode())  # mkstemp's 0600 → what any written file gets under the umask
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _add(writer: Any, name: str, t: torch.Tensor, outtype: str) -> None:
    """One tensor in the requested type; 1-D tensors (norms) stay F32 as llama.cpp keeps them, and
    Q8_0 falls back to F16 for rows that are not a multiple of its 32-element block."""
    import gguf

    data = t.detach().float().cpu().numpy()
    if data.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
        q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        if params.get("rope_type", "default") not in (None, "default"):
            raise GGUFExportError(f"rope scaling {params.get('rope_type')!r} is not exported yet")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise GGUFExportError(f"rope scaling {scaling} is not exported yet")
    return float(getattr(config, "rope_theta", 10000.0))


def _add_tokenizer(writer: Any, tokenizer: Any) -> None:
    """A byte-level BPE tokenizer (GPT-2 style, e.g. SmolLM2's) as llama.cpp's 'gpt2' tokenizer model."""
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError("GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers; this one is {model.get('type')!r}")
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [gguf.TokenType.UNUSED] * n
    for tok, i in vocab.items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("pad", tokenizer.pad_token_id), ("unk", tokenizer.unk_token_id)):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(int(tid))
    writer.add_add_bos_token(False)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def export_model_gguf(model: nn.Module, tokenizer: Any, out: str | Path, outtype: str = "f16",
                      name: str | None = None) -> Path:
    """Write a plain (already merged / unloaded) Llama-family model as one GGUF file."""
    import gguf

    if outtype not in OUT_TYPES:
        raise GGUFExportError(f"outtype must be one of {OUT_TYPES}, got {outtype!r}")
    if getattr(model, "deltatune_state", None) is not None:
        raise GGUFExportError("the model still carries adapters; merge them first (deltatune.unload(model))")
    config: Any = model.config
    arch = _arch(config)
    n_head, n_kv = _heads(config)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    if head_dim * n_head != config.hidden_size:
        raise GGUFExportError("head_dim × heads ≠ hidden_size: not a layout llama.cpp's llama architecture reads")
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    bases = [k.removesuffix(".weight") for k in state]
    if any(not k.endswith(".weight") for k in state):
        raise GGUFExportError(f"biases are not part of the llama layout: {[k for k in state if not k.endswith('.weight')][:3]}")
    names = gguf_tensor_names(config, bases)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    def fill(w: Any) -> None:
        w.add_name(name or str(getattr(config, "_name_or_path", "") or "deltatune-export"))
        w.add_type("model")
        w.add_context_length(int(config.max_position_embeddings))
        w.add_embedding_length(int(config.hidden_size))
        w.add_block_count(int(config.num_hidden_layers))
        w.add_feed_forward_length(int(config.intermediate_size))
        w.add_rope_dimension_count(head_dim)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_rope_freq_base(_rope_theta(config))
        w.add_vocab_size(int(config.vocab_size))
        w.add_file_type(int(file_type))
        _add_tokenizer(w, tokenizer)
        for key, t in state.items():
            gname = names[key.removesuffix(".weight")]
            heads = _permute_for(gname, config)
            _add(w, gname + ".weight", permute_qk(t, heads) if heads else t, outtype)

    return _atomic_gguf(Path(out), fill, gguf.MODEL_ARCH_NAMES[arch])


def export_adapter_gguf(adapter_dir: str | Path, config: Any, out: str | Path, outtype: str = "f32") -> Path:
    """Write the LoRA adapter in ``adapter_dir`` (PEFT layout) as a llama.cpp GGUF adapter file.

    ``config`` is the base model's config (heads for the permutation, layer count for the names).
    Refuses what llama.cpp's LoRA format cannot hold: DoRA magnitudes, ``modules_to_save``, trained
    biases, embedding LoRA, non-LoRA adapters.
    """
    import gguf

    from ..io import read_adapter_info

    if outtype not in ("f32", "f16"):
        raise GGUFExportError(f"adapter outtype must be f32 or f16 (the factors are small), got {outtype!r}")
    f = read_adapter_info(adapter_dir)
    cfg = f.config
    where = Path(adapter_dir)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise GGUFExportError(f"{where}: peft_type={cfg.get('peft_type')!r}; llama.cpp's adapter format holds LoRA only")
    if cfg.get("use_dora") or any("lora_magnitude_vector" in k for k in f.tensors):
        raise GGUFExportError(f"{where}: a DoRA adapter: llama.cpp's LoRA format has no magnitude vectors; "
                              "merge it (deltatune export --merge) and export the merged model instead")
    if cfg.get("modules_to_save"):
        raise GGUFExportError(f"{where}: modules_to_save={cfg['modules_to_save']} are full weight copies, which "
                              "a GGUF LoRA adapter cannot hold; export the merged model instead")
    if cfg.get("bias", "none") not in (None, "none"):
        raise GGUFExportError(f"{where}: bias={cfg['bias']!r}: trained biases cannot go into a GGUF LoRA adapter")
    arch = _arch(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in f.tensors.items():
        body = key.removeprefix(_PREFIX)
        for tag, part in ((".lora_A.weight", "a"), (".lora_B.weight", "b")):
            if body.endswith(tag):
                pairs.setdefault(body[: -len(tag)], {})[part] = t
                break
        else:
            if "lora_embedding" in body:
                raise GGUFExportError(f"{where}: {body}: LoRA on the embedding is not exported to GGUF")
            raise GGUFExportError(f"{where}: tensor {body!r} is not a LoRA factor and cannot be exported")
    names = gguf_tensor_names(config, sorted(pairs))
    r0, alpha0 = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rslora = bool(cfg.get("use_rslora", False))

    def scale(r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if rslora else alpha / r

    # llama.cpp applies alpha/r per tensor pair; write the alpha that reproduces the default scale.
    alpha_gguf = scale(r0, alpha0) * r0
    from ..inject import _pattern_value

    def fill(w: Any) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha_gguf))
        base = cfg.get("base_model_name_or_path")
        if base:
            w.add_string("general.base_model.0.name", str(base))
        for mpath in sorted(pairs):
            parts = pairs[mpath]
            if set(parts) != {"a", "b"}:
                raise GGUFExportError(f"{where}: {mpath} lacks its lora_{'A' if 'a' not in parts else 'B'} tensor")
            a, b = parts["a"].float(), parts["b"].float()  # (r, k), (d, r)
            r = a.shape[0]
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, mpath) or alpha0)
            ratio = scale(r, alpha) / (alpha_gguf / r)
            if abs(ratio - 1.0) > 1e-7:
                b = b * ratio
            gname = names[mpath]
            heads = _permute_for(gname, config)
            if heads:
                b = permute_qk(b, heads)
            _add(w, f"{gname}.weight.lora_a", a, outtype)
            _add(w, f"{gname}.weight.lora_b", b, outtype)

    return _atomic_gguf(Path(out), fill, gguf.MODEL_ARCH_NAMES[arch])
