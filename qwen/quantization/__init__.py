"""Quantized weights: int8 and int4 weight-only layers, and GPTQ folders (the -Int4/-Int8 ones).

* ``layers``: ``Int8Linear`` and ``Int4Linear`` side by side, round-to-nearest quantizers, and
  ``quantize_int8_`` / ``quantize_int4_`` (``--int8`` / ``--int4``);
* ``triton_int8``: the CUDA int8 kernel (Triton); the CPU kernels live in ``qwen.cpu_kernels``;
* ``gptq_format``: the packed GPTQ layout, its settings, and where a folder keeps them;
* ``gptq_load``: loading a GPTQ folder in plain PyTorch (``gptq_backend``), the hook of
  ``QWenPreTrainedModel.from_pretrained``;
* ``gptq_quantizer``: the GPTQ algorithm and the folder writer behind ``run_gptq.py``. It loads
  models, so it imports ``qwen.modeling``; nothing imported here does, which keeps the package
  free of import cycles (``qwen.modeling`` imports ``gptq_load``).

``qwen.quantize`` and ``qwen.gptq`` keep the names they always had.
"""

from .gptq_format import (
    SUPPORTED_BITS,
    GPTQError,
    GPTQSettings,
    dequantize,
    dequantize_layer,
    find_gptq_config,
    pack,
    pack_layer,
    unpack,
)
from .gptq_load import BACKENDS, gptqmodel_available, load_gptq, load_if_gptq
from .layers import (
    BlockLinear,
    Int4Linear,
    Int8Linear,
    cast_unquantized_,
    dequantize_blocks,
    dequantize_groups,
    quantize_blocks,
    quantize_groups,
    quantize_int4_,
    quantize_int8_,
)

__all__ = [
    "BACKENDS", "SUPPORTED_BITS", "BlockLinear", "GPTQError", "GPTQSettings", "Int4Linear", "Int8Linear",
    "cast_unquantized_", "dequantize",
    "dequantize_blocks", "dequantize_groups", "dequantize_layer", "find_gptq_config", "gptqmodel_available",
    "load_gptq", "load_if_gptq", "pack", "pack_layer", "quantize_blocks", "quantize_groups", "quantize_int4_",
    "quantize_int8_", "unpack",
]
