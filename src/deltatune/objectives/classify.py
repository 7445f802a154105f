"""``objective: classify`` — sequence classification, y = W_cls·pool(h_L) + b_cls (the "feature
extraction" of the lecture when only the head trains: method ``head``).

Data: records with a text and a label (``classify:`` section: field names, an optional text pair,
max_length) from ``data.train_file`` / ``data.eval_file``, or with ``data.train_file: null`` the
built-in Wikipedia topic task (:mod:`deltatune.data.wiki_topics`). The label set comes from the
training data (:class:`deltatune.data.labelled.LabelMap`) and is saved with the model.

Model: ``AutoModelForSequenceClassification`` on ``model.spec`` (:mod:`deltatune.classifier`),
with a new K-way head that trains under every method: after the method is applied,
:meth:`Classify.after_apply` makes it trainable (a per-adapter copy beside an adapter).

Loss unit: an example; ``loss_sum`` = Σ_b CE(logits_b, y_b) with logits from ``model(...)``.
Evaluation: accuracy, macro-F1 and the confusion matrix (``confusion_<stage>.png`` in the run
directory), and the mean held-out loss.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.labelled import ClassifyConfig, LabelledExample, LabelMap, load_labelled
from .base import Batch, Objective, Splits, Stage
from .metrics import classification_metrics, plot_confusion

if TYPE_CHECKING:
    from ..testing import TinyCase
    from ..train.runtime import Runtime

log = logging.getLogger("deltatune.train")

__all__ = ["Classify", "Row", "encode_examples", "collate_rows", "predict"]

_INPUTS = ("input_ids", "token_type_ids")  # tokenizer outputs a row keeps (attention_mask is rebuilt)

Row = dict[str, Any]  # input_ids (and token_type_ids): list[int]; label: int; source: str


def encode_examples(examples: Sequence[LabelledExample], labels: LabelMap, tokenizer: Any,
                    max_length: int) -> tuple[list[Row], int]:
    """Tokenise (with the tokenizer's special tokens; pairs as the tokenizer joins them) and map
    labels to ids; an unknown label is a DataError naming its source. Returns (rows, truncated)."""
    ids = [labels.encode(ex) for ex in examples]  # first: an unknown label fails before any work
    if not examples:
        return [], 0
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair or "" for ex in examples] if any(ex.text_pair for ex in examples) else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, verbose=False)
    full = tokenizer(texts, pairs, truncation=False, verbose=False)["input_ids"]
    keys = [k for k in _INPUTS if k in enc]
    rows: list[Row] = []
    for i, ex in enumerate(examples):
        row: Row = {k: list(enc[k][i]) for k in keys}
        row["label"] = ids[i]
        row["source"] = ex.source
        rows.append(row)
    truncated = sum(len(f) > len(r["input_ids"]) for f, r in zip(full, rows))
    return rows, truncated


def collate_rows(rows: Sequence[Row], pad_token_id: int) -> Batch:
    """Right-pad to the longest row: input_ids (B, T) with the pad id, token_type_ids with 0,
    attention_mask (B, T) 1 on real tokens, labels (B,). Decoders pool the last non-pad token,
    which right padding leaves where it was."""
    if not rows:
        raise ValueError("collate: empty batch")
    width = max(len(r["input_ids"]) for r in rows)
    out: Batch = {"input_ids": torch.full((len(rows), width), pad_token_id, dtype=torch.long),
                  "attention_mask": torch.zeros((len(rows), width), dtype=torch.long)}
    if "token_type_ids" in rows[0]:
        out["token_type_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.as_tensor(r["input_ids"])
        out["attention_mask"][i, :n] = 1
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.as_tensor(r["token_type_ids"])
    out["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
    return out


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    return model(**inputs).logits  # (B, K)


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Σ_b cross-entropy of the example's label, fp32 (the loop divides by the examples)."""
    return F.cross_entropy(_logits(model, batch).float(), batch["labels"], reduction="sum")


@torch.no_grad()
def predict(model: nn.Module, rows: Sequence[Row], pad_token_id: int, batch_size: int, rt: Runtime,
            progress: bool = False) -> tuple[list[int], float]:
    """Predicted label ids of ``rows`` and the mean cross-entropy (model mode restored afterwards)."""
    was = model.training
    model.eval()
    preds: list[int] = []
    total = 0.0
    try:
        starts = range(0, len(rows), batch_size)
        for i in tqdm(starts, desc="classify", unit="batch", disable=not progress or len(starts) < 4,
                      leave=False, dynamic_ncols=True):
            batch = rt.to_device(collate_rows(rows[i : i + batch_size], pad_token_id))
            with rt.autocast():
                logits = _logits(model, batch).float()
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            preds.extend(int(p) for p in logits.argmax(-1).tolist())
    finally:
        model.train(was)
    return preds, total / max(1, len(rows))


class Classify(Objective):
    name = "classify"
    summary = "sequence classification: Σ cross-entropy of the label over examples (a new K-way head trains)"
    Config = ClassifyConfig

    def setup(self, cfg: Any, rt: Runtime, *, model: nn.Module | None = None,
              processor: Any = None) -> tuple[nn.Module, Any, Splits]:
        from ..train.config import section

        ccfg = section(cfg, "classify", ClassifyConfig)
        train, held, source = self._examples(cfg, ccfg)
        labels = LabelMap.from_labels(ex.label for ex in train)
        if model is None or processor is None:
            from ..classifier import load_classifier

            model, processor = load_classifier(cfg.model.spec, labels, dtype=cfg.model.dtype, device=rt.device)
        self._check_model(model, labels)
        self.tokenizer = processor
        self.labels = labels
        self.pad = int(processor.pad_token_id)
        train_rows, cut = encode_examples(train, labels, processor, ccfg.max_length)
        eval_rows, cut_eval = encode_examples(held, labels, processor, ccfg.max_length)
        counts = {n: 0 for n in labels.names}
        for ex in train:
            counts[ex.label] += 1
        log.info("data: %s; %d train, %d eval examples, %d labels", source, len(train_rows), len(eval_rows),
                 len(labels))
        info = {"format": "classify", "source": source, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
                "labels": list(labels.names), "train_label_counts": counts, "truncated": cut + cut_eval}
        return model, processor, Splits(train=train_rows, eval=eval_rows, info=info)

    @staticmethod
    def _examples(cfg: Any, ccfg: ClassifyConfig) -> tuple[list[LabelledExample], list[LabelledExample], str]:
        if cfg.data.train_file is None:
            from ..data.wiki_topics import load_topic_split

            train, held = load_topic_split(ccfg.num_train, ccfg.num_eval)
            return train, held, "built-in Wikipedia topics (CC BY-SA 4.0, Wikipedia contributors)"
        train = load_labelled(cfg.data.train_file, ccfg)
        held = load_labelled(cfg.data.eval_file, ccfg) if cfg.data.eval_file else []
        return train, held, str(cfg.data.train_file)

    @staticmethod
    def _check_model(model: nn.Module, labels: LabelMap) -> None:
        from ..classifier import classifier_head

        classifier_head(model)  # a clear error for a model without one
        k = int(getattr(getattr(model, "config", None), "num_labels", -1))
        if k != len(labels):
            raise ValueError(f"the model's head has {k} outputs but the training data has {len(labels)} labels "
                             f"({', '.join(labels.names[:8])} …)")

    def after_apply(self, model: nn.Module) -> None:
        """The new head trains under every method (called after the method, before the optimizer)."""
        from ..classifier import train_head

        train_head(model)

    @classmethod
    def tiny_case(cls) -> TinyCase:
        """Tiny Llama classifier (3 labels) and 6 records written to a temporary directory."""
        import json
        import tempfile

        from transformers import (
            AutoModelForSequenceClassification,
            LlamaConfig,
            LlamaForSequenceClassification,
        )

        from ..testing import TinyCase, build_tiny_tokenizer

        tok = build_tiny_tokenizer()
        d = Path(tempfile.mkdtemp(prefix="deltatune-classify-tiny-"))
        recs = [("ball goal team", "sport"), ("bread soup rice", "food"), ("song drum piano", "music"),
                ("goal match ball", "sport"), ("cake bread", "food"), ("choir song", "music")]
        for name, part in (("train", recs[:4]), ("eval", recs[4:])):
            (d / f"{name}.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in part))
        labels = LabelMap(("food", "music", "sport"))
        enc = tok(["ball goal team", "song"], padding=True, return_tensors="pt")  # a padded row: pooling matters

        def make() -> nn.Module:
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
            config.id2label, config.label2id = labels.id2label, labels.label2id  # 3 labels
            return LlamaForSequenceClassification(config).float().eval()

        def outputs(model: nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits  # type: ignore[no-any-return]

        sets = [f"data.train_file={d / 'train.jsonl'}", f"data.eval_file={d / 'eval.jsonl'}", "eval.batch_size=2"]
        return TinyCase(make, tok, sets, outputs, lambda p: AutoModelForSequenceClassification.from_pretrained(p))

    def collate(self, rows: Sequence[Any]) -> Batch:
        return collate_rows(rows, self.pad)

    def weight(self, batch: Batch) -> int:
        return int(batch["labels"].shape[0])

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return loss_sum(model, batch)

    def size(self, batch: Batch) -> int:
        return int(batch["attention_mask"].sum())

    def evaluate(self, model: nn.Module, splits: Splits, rt: Runtime, *, stage: Stage,
                 out_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
        if not splits.eval:
            return {}
        rows: Sequence[Row] = splits.eval
        preds, mean_loss = predict(model, rows, self.pad, self.cfg.eval.batch_size, rt, progress)
        metrics = classification_metrics([int(r["label"]) for r in rows], preds, self.labels.names)
        if stage == "during":
            return {"eval_loss": mean_loss, "accuracy": metrics["accuracy"]}
        out = {"eval_loss": mean_loss, **metrics}
        if out_dir is not None:
            plot_confusion(metrics, out_dir / f"confusion_{stage}.png", title=f"{stage} training: accuracy "
                           f"{metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}")
        log.info("%s training: accuracy %.4f, macro-F1 %.4f, eval loss %.4f (%d examples)", stage,
                 metrics["accuracy"], metrics["macro_f1"], mean_loss, len(rows))
        return out

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from ..classifier import save_classifier

        save_classifier(model, self.tokenizer, out_dir)
