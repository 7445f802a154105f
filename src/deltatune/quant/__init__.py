"""4-bit (NF4/FP4) weight storage for QLoRA, byte-compatible with bitsandbytes.

``nf4``: pure functions ``quantize_4bit(w) -> (packed, state)`` / ``dequantize_4bit(packed, state)``.
"""

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

__all__ = [
    "QuantState4bit",
    "dequantize_4bit",
    "dequantize_fp4",
    "dequantize_nf4",
    "quantize_4bit",
    "quantize_fp4",
    "quantize_nf4",
    "storage_bits_per_param",
]
