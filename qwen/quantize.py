"""The weight-only int8/int4 layers under their first module name (``from qwen.quantize import ...``);
they live in ``qwen.quantization.layers``."""

from .cpu_kernels import qwen_int8_kernel
from .quantization.layers import (
    Int4Linear,
    Int8Linear,
    Kernel,
    dequantize_blocks,
    dequantize_groups,
    quantize_blocks,
    quantize_groups,
    quantize_int4_,
    quantize_int8_,
)

__all__ = [
    "Int4Linear", "Int8Linear", "Kernel", "dequantize_blocks", "dequantize_groups", "quantize_groups",
    "quantize_blocks", "quantize_int4_", "quantize_int8_", "qwen_int8_kernel",
]
