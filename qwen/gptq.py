"""GPTQ under its first module name (``from qwen.gptq import ...``, ``run_gptq.py``); the code lives in
``qwen.quantization``: the format in ``gptq_format``, loading in ``gptq_load``, the algorithm and the
folder writer in ``gptq_quantizer``."""

from .quantization.gptq_format import (
    HUB_KWARGS,
    QUANT_EXTRA_HINT,
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
from .quantization.gptq_load import BACKENDS, gptqmodel_available, load_gptq, load_if_gptq, require_gptqmodel
from .quantization.gptq_quantizer import (
    SEQUENTIAL_STEPS,
    Hessian,
    QuantizedWeight,
    calibration_samples,
    gptq_quantize_weight,
    main,
    quantize_folder,
    quantize_model,
    rtn_quantize_weight,
    save_gptq_folder,
)

__all__ = [
    "BACKENDS", "HUB_KWARGS", "QUANT_EXTRA_HINT", "SEQUENTIAL_STEPS", "SUPPORTED_BITS", "GPTQError", "GPTQSettings",
    "Hessian", "QuantizedWeight", "calibration_samples", "dequantize", "dequantize_layer", "find_gptq_config",
    "gptq_quantize_weight", "gptqmodel_available", "load_gptq", "load_if_gptq", "main", "pack", "pack_layer",
    "quantize_folder", "quantize_model", "require_gptqmodel", "rtn_quantize_weight", "save_gptq_folder", "unpack",
]
