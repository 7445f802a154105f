"""``objective: causal_lm`` — supervised fine-tuning of a causal LM (the built-in demo's objective).

Data: ``data:`` files or the built-in JSON-extraction task, tokenised with the chat template and
prompts masked (``deltatune.data``). Loss unit: a label token (labels ≠ −100 after the causal
shift). Evaluation: token-weighted held-out loss and perplexity, plus exact match of greedy replies
against the references (``eval:``). Saved as a PEFT-layout adapter (adapter methods) or an HF model
directory (full / head / partial), as the method's registry row says.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..data import PreparedData, Tokenized, collate, data_report, prepare_data
from ..losses import IGNORE_INDEX, causal_loss_sum, causal_loss_tokens, token_loss_sum
from .base import Batch, Objective, Splits, Stage

if TYPE_CHECKING:
    from ..testing import TinyCase
    from ..train.runtime import Runtime

log = logging.getLogger("deltatune.train")

__all__ = ["CausalLM", "model_loss_sum", "loss_tokens", "eval_loss"]

# Model families whose logits are exactly lm_head(final hidden state): for these the head is applied
# only at positions that carry a label (completion-only loss skips most prompt positions, and the
# 49k-row head is ~20 % of SmolLM2's forward FLOPs).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "phi3", "olmo", "olmo2", "smollm3"}


def loss_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Label tokens of a causal-LM batch: labels ≠ −100 after the one-position shift."""
    return causal_loss_tokens(batch["labels"])


def _output_head(model: nn.Module) -> nn.Module | None:
    """The output head of a plain-head model family, else None (logits then come out whole)."""
    inner = getattr(model, "module", model)  # DDP / FSDP keep the model as .module
    if getattr(getattr(inner, "config", None), "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def _labelled_positions_only(head: nn.Module, keep: torch.Tensor) -> Iterator[None]:
    """A forward pre-hook on the head for one call: hidden (B, T, H) → (N, H), the positions
    ``keep`` (B, T−1) marks (the last position predicts nothing), so the logits come out (N, V)."""

    def pick(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][:, :-1][keep], *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def model_loss_sum(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Σ token cross-entropy over positions with a label (causal shift applied), through ``model(...)``."""
    labels = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    head = _output_head(model)
    if head is not None:
        keep = labels != IGNORE_INDEX  # (B, T-1)
        with _labelled_positions_only(head, keep):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, V)
        return token_loss_sum(logits, labels[keep])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return causal_loss_sum(logits, batch["labels"])


@torch.no_grad()
def eval_loss(model: nn.Module, rows: Sequence[Tokenized], pad_id: int, batch_size: int,
              rt: Runtime) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``rows`` (model mode restored afterwards)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(rows), batch_size):
            batch = rt.to_device(collate(cast(Sequence[Any], rows[i : i + batch_size]), pad_id))
            with rt.autocast():
                total += float(model_loss_sum(model, batch))
            count += loss_tokens(batch)
    finally:
        model.train(was)
    mean = total / max(1, count)
    return {"loss": mean, "ppl": math.exp(min(mean, 50.0)), "tokens": count}


class CausalLM(Objective):
    name = "causal_lm"
    summary = "causal-LM fine-tuning: Σ next-token cross-entropy over the label tokens (prompts masked)"

    def setup(self, cfg: Any, rt: Runtime, *, model: nn.Module | None = None,
              processor: Any = None) -> tuple[nn.Module, Any, Splits]:
        if model is None or processor is None:
            from ..models import load_model

            model, processor = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=rt.device)
        data = prepare_data(cfg.data, processor)
        line, problems = data_report(data)  # nothing vanishes silently: dropped/truncated rows named
        log.info("%s", line)
        for problem in problems:
            log.warning("%s", problem)
        self.tokenizer = processor
        self.pad = int(processor.pad_token_id)
        info = {"format": data.format, "train_rows": len(data.train), "eval_rows": len(data.eval),
                "skipped_records": data.skipped, "skipped_messages": data.skipped_messages,
                "truncated": data.truncated, "dropped_records": data.dropped,
                "dropped_sources": data.dropped_sources}
        return model, processor, Splits(train=data.train, eval=data.eval, info=info, extra=data)

    def collate(self, rows: Sequence[Any]) -> Batch:
        return dict(collate(rows, self.pad))

    def weight(self, batch: Batch) -> int:
        return loss_tokens(batch)

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model_loss_sum(model, batch)

    def evaluate(self, model: nn.Module, splits: Splits, rt: Runtime, *, stage: Stage,
                 out_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
        ecfg = self.cfg.eval
        data = cast(PreparedData, splits.extra)
        out: dict[str, Any] = {}
        if splits.eval:
            out.update({f"eval_{k}": v for k, v in
                        eval_loss(model, cast(Sequence[Tokenized], splits.eval), self.pad, ecfg.batch_size, rt).items()})
        if stage == "during":
            return {"eval_loss": out["eval_loss"]} if out else {}
        if ecfg.exact_match and data.eval_prompts:
            from ..generate import generate_texts
            from ..tasks import exact_match, score_exact_match

            t0 = time.perf_counter()
            preds = generate_texts(model, self.tokenizer, data.eval_prompts, max_new_tokens=ecfg.max_new_tokens,
                                   batch_size=ecfg.batch_size, progress=progress)
            out["exact_match"] = score_exact_match(preds, data.eval_references)
            out["examples"] = [{"reference": r, "prediction": p}
                               for r, p in list(zip(data.eval_references, preds))[:3]]
            out["generate_seconds"] = round(time.perf_counter() - t0, 2)
            if out_dir is not None:  # every prediction, to see which ones fail
                from ..io import atomic_write_bytes

                lines = [json.dumps({"reference": r, "prediction": p, "exact_match": exact_match(p, r)})
                         for r, p in zip(data.eval_references, preds)]
                atomic_write_bytes(out_dir / f"predictions_{stage}.jsonl", ("\n".join(lines) + "\n").encode())
        log.info("%s training: %s", stage, {k: v for k, v in out.items() if k != "examples"})
        return out

    @classmethod
    def tiny_case(cls) -> TinyCase:
        from transformers import AutoModelForCausalLM

        from ..testing import TinyCase, build_tiny_tokenizer, make_tiny_llama

        tok = build_tiny_tokenizer()
        ids = torch.randint(4, len(tok), (2, 9), generator=torch.Generator().manual_seed(0))

        def make() -> nn.Module:
            return make_tiny_llama(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)

        def outputs(model: nn.Module) -> torch.Tensor:
            with torch.no_grad():
                return cast(torch.Tensor, model(input_ids=ids).logits)

        # The built-in task, 4 training rows; no generation (exact match is tested in tests/train).
        sets = ["data.num_train=4", "data.num_eval=2", "eval.exact_match=false", "eval.batch_size=2"]
        return TinyCase(make, tok, sets, outputs, lambda d: AutoModelForCausalLM.from_pretrained(d))

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from ..registry import get_method

        method = get_method(self.cfg.method)
        if method.save is not None:  # the method writes its own files (mix: λ + the composed adapter)
            method.save(model, out_dir)
            return
        if method.saves == "adapter":
            from ..io import save_adapter

            save_adapter(model, out_dir / "adapter")
            return
        hf: Any = model
        hf.save_pretrained(out_dir / "model", safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir / "model")
