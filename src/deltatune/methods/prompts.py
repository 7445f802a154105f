"""Prompt tuning, prefix tuning and P-Tuning v2 through one seam (MISSION §5).

- Prompt tuning (Lester et al. 2021): k trainable vectors P ∈ ℝ^{k×d} prepended to the input
  embeddings: x' = [P; E(x)]. k·d parameters, once.
- Prefix tuning (Li & Liang 2021): trainable keys/values P_K, P_V ∈ ℝ^{l×d_kv} at every layer, so
  each attention reads softmax(q·[P_K; K]ᵀ/√d_h)·[P_V; V]. l·d_kv·L·2 parameters; optionally
  reparameterised during training by an MLP (§4.3: "P = MLP(P')"), folded away when saving.
- P-Tuning v2 (Liu et al. 2022): "deep prompt tuning" — a prompt at every layer. Its reference code
  (THUDM/P-tuning-v2, ``model/prefix_encoder.py``) realises that as per-layer key/value prefixes
  (``past_key_values``), exactly prefix tuning without the reparameterisation; PEFT does the same
  (its PrefixEncoder is adapted from that file, P-Tuning v2 = ``prefix_projection=False``), and so
  do we: ``p_tuning_v2`` is ``kind="prefix", projection=False`` and saves as PEFT's PREFIX_TUNING.

The seam is a pair of hooks on the transformer backbone (``model.base_model``; the model's own
forward and the training loop's hidden-state path both go through it). Callers never see the
virtual tokens: before the backbone runs, the prompt is prepended to the input embeddings
(prompt tuning) or a ``DynamicCache`` is pre-filled with the prefix keys/values (prefix), the
attention mask gets k leading ones and given position ids shift by k; after it runs, the k virtual
positions are cut from the hidden states, so logits have the caller's length and labels need no
−100 padding. Decoding steps (the cache already holds the virtual tokens) only get the mask and
position shift. Positions: real tokens sit at k, k+1, … as in PEFT.

One difference from PEFT's training loss: PEFT also scores token 0 from the last virtual position
when labels[0] ≠ −100; we return only the caller's positions (as an unprompted model would), so
with completion-only labels the two losses are identical.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from .lora import weight_checksum, weight_of

if TYPE_CHECKING:
    from ..io import AdapterFile

__all__ = [
    "PromptConfig", "PromptEncoder", "PromptSeam", "ModelDims", "model_dims", "prefix_key_values",
    "flatten_key_values", "inject", "set_active", "disable", "delete", "get_seam", "save_peft", "load_peft",
]

SEAM_ATTR = "deltatune_prompts"


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


@dataclass
class PromptConfig:
    """Virtual tokens: prompt tuning (input embeddings) or prefix tuning / P-Tuning v2 (every layer's KV)."""

    kind: Literal["prompt", "prefix"] = field(
        default="prompt",
        metadata=_doc("'prompt': k vectors prepended to the input embeddings (prompt tuning); 'prefix': keys/"
                      "values at every layer (prefix tuning, P-Tuning v2). `deltatune train` sets it from method."),
    )
    num_virtual_tokens: int = field(default=20, metadata=_doc("Number of virtual tokens k (prompt) or l (prefix)."))
    init: Literal["auto", "vocab", "text", "random"] = field(
        default="auto",
        metadata=_doc(
            "'vocab': embeddings (prefix: keys/values) of random vocabulary tokens; 'text': of init_text, "
            "repeated/truncated to k tokens; 'random': N(0, 1) as PEFT; 'auto': vocab, or random with projection."
        ),
    )
    init_text: str | None = field(default=None, metadata=_doc("Text whose tokens initialise the prompt (init=text)."))
    tokenizer: str | None = field(
        default=None, metadata=_doc("Tokenizer directory for init=text (default: the model's own directory).")
    )
    projection: bool = field(
        default=False,
        metadata=_doc("Prefix only: produce the prefix with an MLP during training (PEFT's prefix_projection); "
                      "it is folded into a plain prefix when saving."),
    )
    projection_hidden: int | None = field(
        default=None, metadata=_doc("Hidden width of the prefix MLP (default: the key/value width).")
    )

    def __post_init__(self) -> None:
        if self.kind not in ("prompt", "prefix"):
            raise ValueError(f"prompt.kind must be 'prompt' or 'prefix', got {self.kind!r}")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"prompt.num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in ("auto", "vocab", "text", "random"):
            raise ValueError(f"prompt.init must be 'auto', 'vocab', 'text' or 'random', got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise ValueError("prompt.init='text' needs prompt.init_text")
        if self.projection and self.init in ("vocab", "text"):
            raise ValueError("prompt.init='vocab'/'text' sets the prefix itself; with projection=true the prefix "
                             "comes from an MLP: use init='random' (or 'auto')")
        if self.projection_hidden is not None and self.projection_hidden < 1:
            raise ValueError(f"prompt.projection_hidden must be >= 1, got {self.projection_hidden}")

    @property
    def PEFT_TYPE(self) -> str:  # noqa: N802 - the name io.py dispatches on, as for the other methods
        return _PEFT_TYPE[self.kind]

    def resolved_init(self) -> str:
        return ("random" if self.projection else "vocab") if self.init == "auto" else self.init


@dataclass(frozen=True)
class ModelDims:
    """The widths a prompt adapter is shaped by."""

    hidden: int  # d: input-embedding width (prompt tuning)
    num_layers: int  # L
    num_heads: int  # query heads
    kv_heads: int  # H_kv (< num_heads under grouped-query attention)
    head_dim: int  # d_h

    @property
    def kv_width(self) -> int:
        """d_kv = H_kv·d_h: PEFT's ``token_dim`` for prefixes."""
        return self.kv_heads * self.head_dim


def model_dims(model: nn.Module) -> ModelDims:
    cfg: Any = getattr(model, "config", None)
    if cfg is None:
        raise ValueError(f"{type(model).__name__} has no transformers config; prompt methods need one")
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    hidden = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    return ModelDims(hidden, int(cfg.num_hidden_layers), heads, kv, head_dim)


def prefix_key_values(flat: torch.Tensor, dims: ModelDims, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (key, value), each (B, H_kv, l, d_h), from the flat prefix (l, L·2·H_kv·d_h).

    The flat layout is PEFT's (its saved ``prompt_embeddings``): per virtual token, [layer][key|value]
    [head][dim] — PEFT views it as (B, l, 2L, H, d_h) and permutes to (2L, B, H, l, d_h)."""
    n = flat.shape[0]
    x = flat.view(n, 2 * dims.num_layers, dims.kv_heads, dims.head_dim).permute(1, 2, 0, 3)  # (2L, H, l, d_h)
    x = x.unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, l, d_h), no copy
    return [(x[2 * i], x[2 * i + 1]) for i in range(dims.num_layers)]


def flatten_key_values(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Inverse of :func:`prefix_key_values` for batch 1: [(1, H, l, d_h)]·L → (l, L·2·H·d_h)."""
    x = torch.stack([t[0] for pair in kv for t in pair])  # (2L, H, l, d_h)
    return x.permute(2, 0, 1, 3).reshape(x.shape[2], -1)


class PromptEncoder(nn.Module):
    """The trainable part of one prompt adapter. ``forward()`` gives the rows the seam uses:
    prompt (k, d); prefix (l, L·2·d_kv), through the MLP d_kv → h → L·2·d_kv when projected."""

    def __init__(self, config: PromptConfig, dims: ModelDims, rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kind = config.kind
        self.num_virtual_tokens = n = config.num_virtual_tokens
        self.transform: nn.Sequential | None = None
        width = dims.hidden if config.kind == "prompt" else dims.num_layers * 2 * dims.kv_width
        if config.projection:
            # Li & Liang §4.3 / PEFT: embedding (l, d_kv) → Linear → tanh → Linear; PEFT's default init.
            hidden = config.projection_hidden or dims.kv_width
            self.embedding = nn.Parameter(torch.randn(n, dims.kv_width))
            self.transform = nn.Sequential(nn.Linear(dims.kv_width, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Parameter(torch.randn(n, width) if rows is None else rows.detach().float().clone())
        want = [n, dims.kv_width if config.projection else width]
        if list(self.embedding.shape) != want:
            raise ValueError(f"prompt rows have shape {list(self.embedding.shape)}, expected {want}")

    def forward(self) -> torch.Tensor:
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def folded(self) -> torch.Tensor:
        """What is saved: the rows themselves (the MLP applied once, PEFT's ``prompt_embeddings``)."""
        with torch.no_grad():
            return self().detach().float().cpu().contiguous()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, virtual_tokens={self.num_virtual_tokens}, projection={self.transform is not None}"


class PromptSeam(nn.Module):
    """Holds the named prompt adapters of a model and the two backbone hooks that apply the active one."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoders = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self._strip = 0  # virtual positions to cut from the backbone output of the current call
        self._arg_names: list[str] | None = None
        self._handles: list[Any] = []

    def encoder(self, name: str) -> PromptEncoder:
        enc = self.encoders[name]
        assert isinstance(enc, PromptEncoder)
        return enc

    def attach(self, backbone: nn.Module) -> None:
        # Bound methods (not closures) so copy.deepcopy(model) re-points the hooks at the copy's seam.
        self._handles = [backbone.register_forward_pre_hook(self._before, with_kwargs=True),
                         backbone.register_forward_hook(self._after)]

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ hooks
    def _before(self, backbone: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._strip = 0
        if self.disabled or self.active is None:
            return None
        enc = self.encoder(self.active)
        if self._arg_names is None:
            self._arg_names = list(inspect.signature(backbone.forward).parameters)
        kw = dict(kwargs)
        kw.update(zip(self._arg_names, args))  # positional → named, so one code path handles both
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        batch, n, device = ref.shape[0], enc.num_virtual_tokens, ref.device
        cache_key = "past_key_values" if "past_key_values" in kw else "cache"
        cache = kw.get(cache_key)
        first = cache is None or cache.get_seq_length() == 0  # the virtual tokens are not in the cache yet
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("prompt adapters need a 2-D (batch, length) attention mask, got a "
                                 f"{mask.dim()}-D one")
            kw["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)  # (B, k + T_seen)
        pos = kw.get("position_ids")
        if enc.kind == "prompt" and first:
            if embeds is None:
                embeds = _input_embeddings(backbone)(ids)
            prompt = enc().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, k, d)
            kw["input_ids"], kw["inputs_embeds"] = None, torch.cat([prompt, embeds], dim=1)  # (B, k + T, d)
            if pos is not None:
                virtual = torch.arange(n, device=device, dtype=pos.dtype).expand(pos.shape[0], n)
                pos = torch.cat([virtual, pos + n], dim=1)
            if kw.get("token_type_ids") is not None:
                tt = kw["token_type_ids"]
                kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], n), tt], dim=1)
            self._strip = n
        else:
            if enc.kind == "prefix" and first:
                kw[cache_key] = self._prefilled(backbone, enc, cache, batch, device)
            if pos is not None:
                pos = pos + n
        if pos is not None:
            kw["position_ids"] = pos
        return (), kw

    def _prefilled(self, backbone: nn.Module, enc: PromptEncoder, cache: Any, batch: int,
                   device: torch.device) -> Any:
        from transformers import DynamicCache

        if backbone.training and torch.is_grad_enabled() and any(
                getattr(m, "gradient_checkpointing", False) for m in backbone.modules()):
            # transformers drops the cache inside checkpointed layers, which would silently drop the prefix.
            raise ValueError("prefix tuning / P-Tuning v2 cannot train with gradient checkpointing (the layers "
                             "drop the KV cache that carries the prefix); set train.gradient_checkpointing=false")
        if cache is None:
            cache = DynamicCache(config=getattr(backbone, "config", None))
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else weight_of(_input_embeddings(backbone)).dtype)  # the dtype the layers' own keys/values will have
        for i, (k, v) in enumerate(prefix_key_values(enc().to(dtype), self.dims, batch)):
            cache.update(k, v, i)  # (B, H_kv, l, d_h) each; the layers append their own after it
        return cache

    def _after(self, backbone: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        n, self._strip = self._strip, 0
        if not n:
            return None
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output.last_hidden_state = output.last_hidden_state[:, n:]  # (B, T, d): the caller's positions
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        return output

    def extra_repr(self) -> str:
        return f"active={self.active}, disabled={self.disabled}"


# ---------------------------------------------------------------------------------- management
def _input_embeddings(backbone: nn.Module) -> nn.Module:
    emb = getattr(backbone, "get_input_embeddings")()  # noqa: B009 - nn.Module's typing hides HF methods
    if not isinstance(emb, nn.Module):
        raise TypeError(f"{type(backbone).__name__}.get_input_embeddings() returned {type(emb).__name__}")
    return emb


def _backbone(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return base if isinstance(base, nn.Module) else model


def get_seam(model: nn.Module) -> PromptSeam | None:
    seam = getattr(model, SEAM_ATTR, None)
    return seam if isinstance(seam, PromptSeam) else None


def _state(model: nn.Module) -> Any:
    from ..inject import AdapterState

    state = getattr(model, "deltatune_state", None)
    return state if isinstance(state, AdapterState) else AdapterState()


def _cycle(ids: list[int], n: int) -> list[int]:
    """PEFT's TEXT init: truncate, or repeat the text's tokens until there are n."""
    if not ids:
        raise ValueError("prompt.init_text tokenizes to no tokens")
    return (ids * math.ceil(n / len(ids)))[:n]


def _init_ids(model: nn.Module, config: PromptConfig, tokenizer: Any) -> torch.Tensor:
    emb = _input_embeddings(_backbone(model))
    assert isinstance(emb, nn.Embedding)
    n = config.num_virtual_tokens
    if config.resolved_init() == "vocab":
        ids = torch.randint(0, emb.num_embeddings, (n,))  # PEFT's SAMPLE_VOCAB
    else:
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = config.tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not source:
                raise ValueError("prompt.init='text' needs a tokenizer: set prompt.tokenizer to a tokenizer directory")
            tokenizer = AutoTokenizer.from_pretrained(source)
        ids = torch.tensor(_cycle(list(tokenizer(config.init_text)["input_ids"]), n))
    return ids.to(emb.weight.device)


@torch.no_grad()
def _init_rows(model: nn.Module, config: PromptConfig, dims: ModelDims, tokenizer: Any) -> torch.Tensor | None:
    """The starting rows: token embeddings (prompt) or the keys/values the base computes for those tokens
    (prefix; Li & Liang §7.2: initialising with real words' activations beats random)."""
    if config.resolved_init() == "random":
        return None  # N(0, 1), PEFT's nn.Embedding default
    ids = _init_ids(model, config, tokenizer)
    backbone = _backbone(model)
    if config.kind == "prompt":
        return _input_embeddings(backbone)(ids).float()
    was = backbone.training
    backbone.eval()  # no dropout in the activations we copy
    try:
        with disable(model):
            out = backbone(input_ids=ids[None], use_cache=True)
    finally:
        backbone.train(was)
    cache = out[1] if isinstance(out, tuple) else getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    kv = [(layer.keys, layer.values) for layer in cache.layers][: dims.num_layers]
    return flatten_key_values(kv).float()


def _add(model: nn.Module, config: PromptConfig, name: str, encoder: PromptEncoder) -> nn.Module:
    state = _state(model)
    seam = get_seam(model)
    if seam is None:
        seam = PromptSeam(model_dims(model))
        seam.attach(_backbone(model))
        setattr(model, SEAM_ATTR, seam)
    seam.encoders[name] = encoder.to(weight_of(_input_embeddings(_backbone(model))).device)
    state.configs[name] = config
    model.deltatune_state = state  # type: ignore[assignment]
    set_active(model, name)
    return model


def inject(model: nn.Module, config: PromptConfig, name: str = "default", *, tokenizer: Any = None) -> nn.Module:
    """Add prompt adapter ``name`` (prompt or prefix, per ``config.kind``), make it the active one and
    the only trainable parameters. ``tokenizer`` is used for ``init='text'``."""
    if name in _state(model).configs:
        raise ValueError(f"adapter {name!r} already exists; pick another name")
    if config.projection and config.kind != "prefix":
        # Checked here, not in PromptConfig: `deltatune train` sets kind from the method after parsing.
        raise ValueError("prompt.projection applies to prefix tuning only (kind='prefix')")
    dims = model_dims(model)
    rows = _init_rows(model, config, dims, tokenizer)
    return _add(model, config, name, PromptEncoder(config, dims, rows))


def set_active(model: nn.Module, name: str) -> None:
    """Make prompt adapter ``name`` the one applied (one at a time) and exactly its parameters trainable."""
    seam = get_seam(model)
    if seam is None or name not in seam.encoders:
        have = sorted(seam.encoders) if seam is not None else []
        raise ValueError(f"no prompt adapter named {name!r}; this model has {have}")
    seam.active = name
    model.requires_grad_(False)
    seam.encoders[name].requires_grad_(True)
    _state(model).active = [name]


@contextlib.contextmanager
def disable(model: nn.Module) -> Iterator[None]:
    """Inside the block the model computes exactly the base model."""
    seam = get_seam(model)
    was = seam.disabled if seam is not None else False
    try:
        if seam is not None:
            seam.disabled = True
        yield
    finally:
        if seam is not None:
            seam.disabled = was


def delete(model: nn.Module, name: str) -> None:
    seam = get_seam(model)
    if seam is None or name not in seam.encoders:
        raise ValueError(f"no prompt adapter named {name!r}")
    del seam.encoders[name]
    state = _state(model)
    state.configs.pop(name, None)
    state.active = [n for n in state.active if n != name]
    if seam.active == name:
        seam.active = next(iter(seam.encoders), None)
    if not len(seam.encoders):
        seam.detach_hooks()
        delattr(model, SEAM_ATTR)


# ---------------------------------------------------------------------------------- files (PEFT layout)
_PEFT_TYPE = {"prompt": "PROMPT_TUNING", "prefix": "PREFIX_TUNING"}
_KIND_OF: dict[str, Literal["prompt", "prefix"]] = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task_type: without it PeftModel.from_pretrained builds a plain PeftModel, whose forward
    never adds the virtual tokens (GPT2LMHeadModel is not named *ForCausalLM, hence can_generate)."""
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return "CAUSAL_LM"
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None
_PEFT_INIT = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}


def _fingerprint(model: nn.Module, dims: ModelDims) -> dict[str, Any]:

    cfg = getattr(model, "config", None)
    emb = _input_embeddings(_backbone(model))
    return {"architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
            "model_type": getattr(cfg, "model_type", None), "dims": dims.__dict__,
            "embedding_checksum": weight_checksum(weight_of(emb))}


def save_peft(model: nn.Module, path: Path, name: str) -> Path:
    """Write prompt adapter ``name`` in PEFT's PROMPT_TUNING / PREFIX_TUNING layout: adapter_config.json +
    adapter_model.safetensors holding ``prompt_embeddings`` (k, d) or, folded, (l, L·2·d_kv)."""
    from safetensors.torch import save

    from ..io import CONFIG_NAME, WEIGHTS_NAME, atomic_write_bytes

    seam = get_seam(model)
    config = _state(model).configs[name]
    assert seam is not None and isinstance(config, PromptConfig)
    dims = seam.dims
    init = config.resolved_init()
    out: dict[str, Any] = {
        "peft_type": _PEFT_TYPE[config.kind], "task_type": _task_type(model),
        "base_model_name_or_path": _base_name(model),
        "revision": None, "inference_mode": True, "modules_to_save": None, "auto_mapping": None,
        "num_virtual_tokens": config.num_virtual_tokens, "num_transformer_submodules": 1,
        "num_layers": dims.num_layers,
    }
    if config.kind == "prompt":
        text = init == "text" and config.tokenizer is not None  # PEFT's TEXT needs a tokenizer path
        out.update(token_dim=dims.hidden, num_attention_heads=dims.num_heads,
                   prompt_tuning_init="TEXT" if text else _PEFT_INIT.get(init, "RANDOM"),
                   prompt_tuning_init_text=config.init_text, tokenizer_name_or_path=config.tokenizer if text else None,
                   tokenizer_kwargs=None)
    else:
        # Under GQA PEFT sizes the prefix by the key/value heads (token_dim = H_kv·d_h).
        out.update(token_dim=dims.kv_width, num_attention_heads=dims.kv_heads,
                   encoder_hidden_size=config.projection_hidden or dims.kv_width,
                   prefix_projection=config.projection, init_weights=None)
    meta = {"format": "pt", "deltatune_init": init, "deltatune_fingerprint": json.dumps(_fingerprint(model, dims))}
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / WEIGHTS_NAME, save({"prompt_embeddings": seam.encoder(name).folded()}, metadata=meta))
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(out, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_peft(model: nn.Module, f: AdapterFile, name: str, *, trainable: bool = False,
              activate: bool = True) -> nn.Module:
    """Load a PEFT PROMPT_TUNING / PREFIX_TUNING directory. Everything is checked before the model changes."""
    from ..io import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError, AdapterMismatchError

    cfg = f.config
    where = f.directory / CONFIG_NAME
    kind = _KIND_OF.get(str(cfg.get("peft_type")))
    if kind is None:
        raise AdapterFileError(f"{where}: peft_type={cfg.get('peft_type')!r} is not a prompt method")
    state = _state(model)
    if name in state.configs:
        raise ValueError(f"adapter {name!r} already exists on this model; pass another name=")
    if int(cfg.get("num_transformer_submodules") or 1) != 1:
        raise AdapterFileError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']} "
                               "(an encoder-decoder adapter); deltatune's prompt seam serves one stack")
    try:
        n = int(cfg["num_virtual_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{where}: missing or invalid num_virtual_tokens") from e
    rows = f.tensors.get("prompt_embeddings")
    if rows is None:
        raise AdapterFileError(f"{f.directory / WEIGHTS_NAME}: no 'prompt_embeddings' tensor "
                               f"(keys: {sorted(f.tensors)[:5]})")
    dims = model_dims(model)
    what = "d (hidden size)" if kind == "prompt" else "L·2·H_kv·d_h (layers × key/value × KV width)"
    want = (n, dims.hidden if kind == "prompt" else dims.num_layers * 2 * dims.kv_width)
    if tuple(rows.shape) != want:
        raise AdapterMismatchError(
            f"{f.directory}: prompt_embeddings has shape {list(rows.shape)} but this "
            f"{type(model).__name__} needs {list(want)} = num_virtual_tokens × {what}; "
            "the adapter was made for a different base model")
    if kind == "prefix" and int(cfg.get("num_layers", dims.num_layers)) != dims.num_layers:
        raise AdapterMismatchError(f"{f.directory}: num_layers={cfg['num_layers']} but the model has {dims.num_layers}")
    if f.fingerprint:
        theirs = f.fingerprint.get("embedding_checksum")
        ours = _fingerprint(model, dims)["embedding_checksum"]
        if theirs is not None and not math.isclose(ours, float(theirs), rel_tol=2e-2, abs_tol=1e-6):
            warnings.warn(f"{f.directory}: the base model's embeddings differ from those the adapter was trained "
                          f"on (checksum {ours:.6g} vs {float(theirs):.6g}); outputs will not match", stacklevel=3)
    # A projected prefix arrives folded: it loads as the plain prefix it computes (PEFT does the same).
    config = PromptConfig(kind=kind, num_virtual_tokens=n, init="random")
    previous = get_seam(model).active if get_seam(model) is not None else None  # type: ignore[union-attr]
    _add(model, config, name, PromptEncoder(config, dims, rows))
    if not activate and previous is not None:
        set_active(model, previous)
    if not trainable:
        seam = get_seam(model)
        assert seam is not None
        seam.encoders[name].requires_grad_(False)
    return model


def _base_name(model: nn.Module) -> str | None:
    from ..io import base_name_or_path

    return base_name_or_path(model)
