"""``objective: multitask`` — one LoRA adapter per task, trained together in one run (MISSION §1, §9).

``data.tasks`` maps task names to data files (any format ``train`` reads); ``data.task_weights``
optionally repeats a task's examples per epoch. After the method's apply (LoRA, DoRA, QLoRA: a
family with per-sample routing), :meth:`MultiTask.after_apply` replaces the method's adapter by one
adapter per task with the same config. Every row of a batch goes through its own task's adapter
(:func:`deltatune.adapter_per_sample`, differentiable), so a mixed batch trains all adapters at once
and each adapter's gradient comes from its own task's rows only.

Held out per task: the last max(1, n // 10) examples of its file (when it has at least two).
Evaluation: a loss matrix, every task's held-out loss with every adapter (the diagonal is the
task's own adapter; the rest show that the adapters are separate), plus ``eval_loss`` = mean of the
diagonal. Saved: ``adapters/<task>/`` per task in PEFT format.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from ..data import collate, load_examples, tokenize_examples
from .base import Batch, Splits, Stage
from .causal_lm import CausalLM, loss_tokens, model_loss_sum

if TYPE_CHECKING:
    from ..train.runtime import Runtime

log = logging.getLogger("deltatune.train")

__all__ = ["MultiTask"]


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / FSDP keep the model as .module


class MultiTask(CausalLM):
    name = "multitask"
    summary = "one LoRA adapter per task (data.tasks), trained together: each example routed to its task's adapter"
    # LoRA-family methods only, and adapters/<task>/ instead of adapter/: tests/objectives/test_multitask.py
    # covers run(), save and resume; tests/test_matrix.py skips it.
    in_matrix = False

    def setup(self, cfg: Any, rt: Runtime, *, model: nn.Module | None = None,
              processor: Any = None) -> tuple[nn.Module, Any, Splits]:
        d = cfg.data
        if len(d.tasks) < 1:
            raise ValueError("objective 'multitask' needs data.tasks: {task name: data file, ...}")
        if model is None or processor is None:
            from ..models import load_model

            model, processor = load_model(cfg.model.spec, dtype=cfg.model.dtype, device=rt.device)
        self.tokenizer, self.pad = processor, int(processor.pad_token_id)
        self.tasks = list(d.tasks)
        train: list[dict[str, Any]] = []
        evals: dict[str, list[dict[str, Any]]] = {}
        counts: dict[str, dict[str, int]] = {}
        for task, path in d.tasks.items():
            loaded = load_examples(path, d.format, skip_bad_records=d.skip_bad_records)
            rows, _, _ = tokenize_examples(loaded.examples, processor, d.max_length, d.completion_only_loss)
            if not rows:
                raise ValueError(f"data.tasks.{task}: {path} has no example with a loss token")
            n_eval = max(1, len(rows) // 10) if len(rows) >= 2 else 0
            kept, held = rows[: len(rows) - n_eval], rows[len(rows) - n_eval:]
            reps = max(1, round(d.task_weights.get(task, 1.0) * len(kept)))
            tagged = [{**kept[i % len(kept)], "task": task} for i in range(reps)]
            train += tagged
            evals[task] = [{**r, "task": task} for r in held]
            counts[task] = {"train_rows": len(tagged), "eval_rows": len(held), "file_rows": len(rows)}
        log.info("multitask: %s", counts)
        info = {"format": "multitask", "train_rows": len(train), "eval_rows": sum(len(v) for v in evals.values()),
                "tasks": counts}
        eval_rows = [r for rows in evals.values() for r in rows]
        return model, processor, Splits(train=train, eval=eval_rows, info=info, extra=evals)

    def after_apply(self, model: nn.Module) -> None:
        """The method's adapter becomes one adapter per task (same config), all of them trainable."""
        from ..inject import delete_adapter, get_state, inject, lora_layers, set_active

        if not list(lora_layers(model)):
            raise ValueError(f"objective 'multitask' routes examples per adapter; method {self.cfg.method!r} has no "
                             "LoRA layers: use method lora, dora or qlora")
        state = get_state(model)
        (first, config), *rest = state.configs.items()
        if rest:
            raise ValueError(f"objective 'multitask': the model already has adapters {sorted(state.configs)}")
        for task in self.tasks:
            if task == first:
                continue
            inject(model, config, name=task)
            # Same init as the method's own adapter would get (B = 0, A random from the run's seed).
        if first not in self.tasks:
            delete_adapter(model, first)
        set_active(model, self.tasks)

    def collate(self, rows: Sequence[Any]) -> Batch:
        batch: Batch = dict(collate(rows, self.pad))
        batch["adapter"] = [r.get("task") for r in rows]
        return batch

    def loss_sum(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        from ..inject import adapter_per_sample

        with adapter_per_sample(_inner(model), list(batch["adapter"])):
            return model_loss_sum(model, batch)

    @torch.no_grad()
    def _task_loss(self, model: nn.Module, rows: Sequence[Any], adapter: str | None, rt: Runtime) -> float:
        from ..inject import adapter_per_sample

        total, count = 0.0, 0
        bs = self.cfg.eval.batch_size
        for i in range(0, len(rows), bs):
            chunk = rows[i: i + bs]
            batch = rt.to_device(self.collate(chunk))
            with rt.autocast():
                if adapter is None:
                    total += float(model_loss_sum(model, batch))
                else:
                    with adapter_per_sample(model, [adapter] * len(chunk)):
                        total += float(model_loss_sum(model, batch))
            count += loss_tokens(batch)
        return total / max(1, count)

    def evaluate(self, model: nn.Module, splits: Splits, rt: Runtime, *, stage: Stage,
                 out_dir: Path | None = None, progress: bool = False) -> dict[str, Any]:
        from ..inject import lora_layers, unmerge

        evals = cast(dict[str, list[dict[str, Any]]], splits.extra)
        model = _inner(model)
        adapters = [t for t in self.tasks if any(t in layer.adapters for _, layer in lora_layers(model))]
        if any(layer.merged for _, layer in lora_layers(model)):
            unmerge(model)  # the loop merges for evaluation; per-row routing needs the adapters apart
        was = model.training
        model.eval()
        try:
            matrix = {task: {a: self._task_loss(model, rows, a, rt) for a in (adapters or [None])}  # type: ignore[list-item]
                      for task, rows in evals.items() if rows}
        finally:
            model.train(was)
        if adapters:
            own = [matrix[t][t] for t in matrix]
        else:  # before training: the base model on every task
            own = [next(iter(v.values())) for v in matrix.values()]
        out: dict[str, Any] = {"eval_loss": sum(own) / max(1, len(own))} if own else {}
        if stage == "during":
            return out
        out["eval_ppl"] = math.exp(min(out.get("eval_loss", 0.0), 50.0))
        out["task_loss"] = {t: {str(a): v for a, v in row.items()} for t, row in matrix.items()}
        log.info("%s training: %s", stage, out)
        return out

    def save(self, model: nn.Module, out_dir: Path) -> None:
        from ..io import save_adapter

        for task in self.tasks:
            save_adapter(model, out_dir / "adapters" / task, name=task)
