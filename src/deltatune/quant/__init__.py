"""4-bit (NF4/FP4) weight storage for QLoRA, byte-compatible with bitsandbytes.

``linear4bit``: ``Linear4bit`` (frozen 4-bit layer), ``quantize_model``, ``model_storage_report``.
``optim8bit``: ``AdamW8bit`` (8-bit blockwise states), ``PagedAdamW`` (CUDA: bitsandbytes).
``checkpoint``: 4-bit model directories in the transformers + bitsandbytes layout (save, load, storage).
``merge``: merging adapters into the 4-bit base with the error measured (``merge_error_report``).
``nf4``: pure functions ``quantize_4bit(w) -> (packed, state)`` / ``dequantize_4bit(packed, state)``.
"""

from .checkpoint import (
    checkpoint_storage_report,
    is_4bit_checkpoint,
    load_4bit_checkpoint,
    save_4bit_checkpoint,
)
from .linear4bit import Linear4bit, model_storage_report, quantize_model
from .merge import merge_error_report, merged_4bit_copy
from .nf4 import (
    QuantState4bit,
    dequantize_4bit,
    dequantize_fp4,
    dequantize_nf4,
    quantize_4bit,
    quantize_fp4,
    quantize_nf4,
    storage_bits_per_param,
)
from .optim8bit import AdamW8bit, PagedAdamW, optimizer_state_bytes

__all__ = [
    "checkpoint_storage_report",
    "is_4bit_checkpoint",
    "load_4bit_checkpoint",
    "save_4bit_checkpoint",
    "merge_error_report",
    "merged_4bit_copy",
    "AdamW8bit",
    "PagedAdamW",
    "optimizer_state_bytes",
    "Linear4bit",
    "model_storage_report",
    "quantize_model",
    "QuantState4bit",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_nf4",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
    "storage_bits_per_param",
]
