"""Sequence classifiers: y = W_cls·pool(h_L) + b_cls on a pretrained backbone.

The model is transformers' own ``AutoModelForSequenceClassification``: encoders (BERT, RoBERTa,
DeBERTa, …) pool the first token (``classifier``), decoders (Llama/SmolLM2, GPT-2, …) the last
non-pad token (``score``), found from ``config.pad_token_id`` — so the tokenizer gets a pad token
(its eos when it has none) and the config its id.

Model specs are those of :func:`deltatune.models.load_model`: ``default`` (SmolLM2 from its GGUF
file, through the same dequantized HF cache directory — the classifier is built from the same
weights), ``minilm`` (all-MiniLM-L6-v2), an HF directory, or a ``.gguf`` file.

Files (PEFT's convention for ``task_type: "SEQ_CLS"``):

- an adapter method writes its adapter directory as usual, plus the new head as a module to save:
  ``adapter_config.json`` gets ``task_type: "SEQ_CLS"`` and the head's name in ``modules_to_save``,
  the safetensors file the head's tensors (``base_model.model.score.weight``; prompt methods, whose
  PEFT model has no inner wrapper, ``base_model.score.weight``), and ``labels.json`` the label map.
  ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(base,
  num_labels=K), dir)`` then computes the same logits (tests/objectives/test_classify_peft.py);
- full / partial / head runs write an HF directory (``save_pretrained``) with ``id2label``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.labelled import LabelMap, label_map_from_id2label, read_label_map
from .io import CONFIG_NAME, atomic_write_bytes
from .structure import CLASSIFIER_HEADS

log = logging.getLogger("deltatune.classify")

__all__ = ["HEAD_NAMES", "LABELS_NAME", "adapter_labels", "classifier_head", "evaluate_file", "is_classifier",
           "load_classifier", "load_classifier_adapter",
           "save_classifier", "train_head"]

HEAD_NAMES = CLASSIFIER_HEADS
LABELS_NAME = "labels.json"
_ADAPTER = "default"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers reports the new head as 'newly initialized weights'; we say so once ourselves."""
    from transformers.utils import logging as hf_logging

    old, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" for a model that loads in a second
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_directory(spec: str) -> Path:
    from .models import hf_directory

    return hf_directory(spec)


def load_classifier(spec: str, labels: LabelMap | None = None, *, dtype: str | torch.dtype = "auto",
                    device: str | torch.device = "auto") -> tuple[nn.Module, Any]:
    """``AutoModelForSequenceClassification`` (eval mode) and its tokenizer for a model spec.

    ``labels``: the label map of a new head (K = len(labels) outputs, randomly initialised from the
    model's ``initializer_range``, seeded by the caller's RNG); None loads a trained classifier as saved.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .models import resolve_device, resolve_dtype

    path = _hf_directory(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kw: dict[str, Any] = {"dtype": torch_dtype}
    if labels is not None:
        kw.update(num_labels=len(labels), id2label=labels.id2label, label2id=labels.label2id)
    with _quiet_transformers():
        model: Any = AutoModelForSequenceClassification.from_pretrained(path, **kw)
    model.config.problem_type = "single_label_classification"
    if tokenizer.pad_token is None:  # GPT-2, Llama-family tokenizers: pad with eos (as PEFT's examples do)
        if tokenizer.eos_token is None:
            raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    # Decoders pool the last token that is not config.pad_token_id: it must be the tokenizer's pad.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device=dev, dtype=torch_dtype)
    model.eval()
    head_path, head = classifier_head(model)
    head_params = sum(p.numel() for p in head.parameters())
    log.info("classifier on %s (%s): head %r (%d params), %d labels", spec, type(model).__name__, head_path,
             head_params, model.config.num_labels)
    return model, tokenizer


def classifier_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the classification head: the model's child named 'classifier' or 'score'."""
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return name, module
    children = [n for n, _ in model.named_children()]
    raise ValueError(f"{type(model).__name__} has no classification head named {' or '.join(HEAD_NAMES)} "
                     f"(children: {children}); use an AutoModelForSequenceClassification model")


def train_head(model: nn.Module) -> nn.Module:
    """Make the new head train beside whatever the method trains (call after the method's apply).

    A plain model (strategies full / partial / head) trains the head's own parameters; a model with
    adapters gets the head as a per-adapter copy (``ModulesToSave``, PEFT's ``modules_to_save``), so
    the base's head stays as loaded and the adapter file carries the trained one. Returns the head.
    """
    from .inject import ModulesToSave

    name, head = classifier_head(model)
    if getattr(model, "deltatune_state", None) is None:
        head.requires_grad_(True)
        return head
    wrapper = head if isinstance(head, ModulesToSave) else ModulesToSave(head)
    if _ADAPTER not in wrapper.modules_to_save:
        wrapper.add(_ADAPTER)
    wrapper.active = _ADAPTER
    wrapper.modules_to_save[_ADAPTER].requires_grad_(True)
    if wrapper is not head:
        wrapper.train(head.training)
        setattr(model, name, wrapper)
    return wrapper


def _write_labels(out: Path, model: nn.Module) -> None:
    labels = read_label_map(getattr(model, "config", None))
    data = {"id2label": {str(i): n for i, n in labels.id2label.items()}, "label2id": labels.label2id,
            "pad_token_id": getattr(getattr(model, "config", None), "pad_token_id", None)}
    atomic_write_bytes(out / LABELS_NAME, (json.dumps(data, indent=2) + "\n").encode())


def save_classifier(model: nn.Module, tokenizer: Any, out: Path) -> Path:
    """Write ``out/adapter`` (adapter methods) or ``out/model`` (full / partial / head); returns it."""
    from .io import save_adapter

    if getattr(model, "deltatune_state", None) is None:
        target = out / "model"
        hf: Any = model
        hf.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        return target
    target = save_adapter(model, out / "adapter")  # the head goes in as a module to save (any method)
    config = json.loads((target / CONFIG_NAME).read_text())
    config["task_type"] = "SEQ_CLS"  # PEFT then builds PeftModelForSequenceClassification
    atomic_write_bytes(target / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    _write_labels(target, model)
    tokenizer.save_pretrained(target)
    return target


def adapter_labels(path: str | Path) -> LabelMap:
    """The label map saved beside a classifier adapter (``labels.json``)."""
    f = Path(path) / LABELS_NAME
    if not f.is_file():
        raise ValueError(f"{f}: not found; a classifier adapter directory holds {LABELS_NAME} (written by "
                         "deltatune train with objective 'classify')")
    return label_map_from_id2label(json.loads(f.read_text()).get("id2label") or {}, str(f))


def load_classifier_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a SEQ_CLS adapter directory (any method) onto a classifier: the adapter and, as a module
    to save, the trained head (:func:`deltatune.io.load_adapter` does both)."""
    from .io import load_adapter

    name, _ = classifier_head(model)
    config = json.loads((Path(path) / CONFIG_NAME).read_text())
    if name not in (config.get("modules_to_save") or []):
        raise ValueError(f"{Path(path) / CONFIG_NAME}: modules_to_save {config.get('modules_to_save')} lacks the "
                         f"classifier head {name!r}; was it saved by a classification run?")
    return load_adapter(model, path)


def is_classifier(model_spec: str, adapter: str | Path | None = None) -> bool:
    """Whether ``deltatune eval`` is looking at a classifier: a SEQ_CLS adapter, or a model directory
    saved as ``*ForSequenceClassification``."""
    if adapter is not None:
        if (Path(adapter) / LABELS_NAME).is_file():
            return True
        return _json_object(Path(adapter) / CONFIG_NAME).get("task_type") == "SEQ_CLS"
    archs = _json_object(Path(model_spec) / "config.json").get("architectures")
    return isinstance(archs, list) and any(str(a).endswith("ForSequenceClassification") for a in archs)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or {} when it is missing or malformed: only a peek to pick the
    evaluation path; the loader that follows reports a malformed file with its name and line."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def evaluate_file(model_spec: str, adapter: str | Path | None, data: str | Path, cfg: Any,
                  batch_size: int = 64, dtype: str = "auto") -> dict[str, Any]:
    """Accuracy, macro-F1, confusion matrix and mean loss of a classifier (a model directory, or a
    base + SEQ_CLS adapter) on a labelled file; ``cfg`` is a :class:`ClassifyConfig` (field names)."""
    from .data.labelled import load_labelled
    from .objectives.classify import encode_examples, predict
    from .objectives.metrics import classification_metrics
    from .train.runtime import Runtime

    if adapter is not None:
        labels = adapter_labels(adapter)
        model, tok = load_classifier(model_spec, labels, dtype=dtype)
        load_classifier_adapter(model, adapter)
    else:
        model, tok = load_classifier(model_spec, None, dtype=dtype)
        labels = read_label_map(model.config)
    # Not beyond the model's positions (BERT: 512), whatever the CLI's causal-LM default is.
    limit = int(getattr(model.config, "max_position_embeddings", None) or cfg.max_length)
    rows, truncated = encode_examples(load_labelled(data, cfg), labels, tok, min(cfg.max_length, limit))
    rt = Runtime(next(model.parameters()).device, bf16=False)
    preds, mean_loss = predict(model, rows, int(tok.pad_token_id), batch_size, rt, progress=True)
    metrics = classification_metrics([int(r["label"]) for r in rows], preds, labels.names)
    return {"examples": len(rows), "truncated": truncated, "eval_loss": mean_loss, **metrics}
