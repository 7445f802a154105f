"""4-bit (NF4/FP4) weight storage for QLoRA, byte-compatible with bitsandbytes.

``linear4bit``: ``Linear4bit`` (frozen 4-bit layer), ``quantize_model``, ``model_storage_report``.
``optim8bit``: ``AdamW8bit`` (8-bit blockwise states), ``PagedAdamW`` (CUDA: bitsandbytes).
``nf4``: pure functions ``quantize_4bit(w) -> (packed, state)`` / ``dequantize_4bit(packed, state)``.
"""

from .linear4bit import Linear4bit, model_storage_report, quantize_model
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
