"""Loading GPTQ folders (the -Int4/-Int8 ones) in plain PyTorch, without auto-gptq or gptqmodel.

Loading (``AutoModelForCausalLM.from_pretrained(folder, gptq_backend=...)`` after ``import qwen``):

* ``"dequant"`` (the default without gptqmodel): weights are dequantized once to the load dtype.
  Outputs equal the GPTQ model's; memory and speed are those of an unquantized model.
* ``"int8"``: dequantized layer by layer straight into :class:`qwen.quantize.Int8Linear` (one scale
  per output channel), so the blocks take 1 byte per weight and decode faster on a CPU. It adds a
  small rounding error on top of GPTQ's.
* ``"int4"``: 4-bit folders keep their 4-bit values in :class:`qwen.quantize.Int4Linear` (PyTorch's
  int4 kernels: tinygemm on CUDA, which computes in bf16), the fastest batch-1 decode on a GPU. Load
  onto the device the model runs on (``device_map="cuda"``): the packing differs per device. Folders
  quantized with act-order (desc_act) are refused with a message.
* ``"gptqmodel"``: transformers' own GPTQ integration with gptqmodel's kernels (the ``quant``
  extra); the default when gptqmodel and optimum are installed, or when the caller passes a
  ``quantization_config`` (transformers' GPTQConfig, as Q-LoRA does).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import default_dtype
from .gptq_format import (
    HUB_KWARGS,
    QUANT_EXTRA_HINT,
    GPTQError,
    GPTQSettings,
    dequantize,
    find_gptq_config,
    resolve_file,
    unpack,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "dequant", "int8", "int4", "gptqmodel")


# ----- loading ------------------------------------------------------------------------------------


class _Tensors:
    """Tensors of a checkpoint's weight files, read one at a time (safetensors, or legacy .bin)."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.files = files
        self.where: dict[str, Any] = {}
        for f in files:
            if f.suffix == ".safetensors":
                handle = safe_open(str(f), framework="pt", device="cpu")
                self.where.update(dict.fromkeys(handle.keys(), handle))
            else:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                self.where.update({k: state for k in state})
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        self.used.add(key)
        src = self.where[key]
        return src[key] if isinstance(src, dict) else src.get_tensor(key)


def _weight_files(path: str | Path, settings: GPTQSettings, hub: dict[str, Any]) -> list[Path]:
    bases = [settings.model_file_base_name, "model", f"gptq_model-{settings.bits}bit-{settings.group_size}g"]
    bases = list(dict.fromkeys(b for b in bases if b))
    for index in [f"{b}.safetensors.index.json" for b in bases] + ["pytorch_model.bin.index.json"]:
        found = resolve_file(path, index, hub)
        if found is not None:
            shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
            files = [resolve_file(path, s, hub) for s in shards]
            missing = [s for s, f in zip(shards, files, strict=True) if f is None]
            if missing:
                raise GPTQError(f"{path}: {index} names weight files that are missing: {missing}")
            return files
    for name in [f"{b}.safetensors" for b in bases] + [f"{b}.bin" for b in bases] + ["pytorch_model.bin"]:
        found = resolve_file(path, name, hub)
        if found is not None:
            return [found]
    local = Path(str(path)) / (hub.get("subfolder") or "")
    candidates = sorted(local.glob("*.safetensors")) if local.is_dir() else []
    if len(candidates) == 1:
        return candidates
    raise GPTQError(f"{path}: no GPTQ weight file found (looked for {', '.join(bases)}.safetensors and shards)")


def _device_of(device_map: Any) -> torch.device:
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise GPTQError("a GPTQ folder loads onto one device; pass device_map='cpu', 'cuda' or 'auto'")
        device_map = devices.pop()
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def _dtype_of(dtype: Any, config, tensors: _Tensors) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # the stored dtype of the unquantized tensors (fp16 in released folders)
        floats = (tensors.get(k).dtype for k in tensors.where if k.endswith("ln_f.weight"))
        return next(floats, torch.float16)
    if isinstance(dtype, str):
        return getattr(torch, dtype.removeprefix("torch."))
    return config.flag_dtype() or default_dtype()


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight)
    if bias is not None:
        linear.bias = nn.Parameter(bias)
    return linear


def load_if_gptq(cls, path, kwargs: dict[str, Any]):
    """The hook of ``QWenPreTrainedModel.from_pretrained``: load a GPTQ folder and return the model, or
    return None to let transformers load the folder (an unquantized one, or ``gptq_backend="gptqmodel"``).

    Pops ``gptq_backend`` from ``kwargs``; ``kwargs["config"]`` is the folder's QWenConfig.
    """
    backend = kwargs.pop("gptq_backend", None) or "auto"
    if backend not in BACKENDS:
        raise GPTQError(f"gptq_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    config = kwargs["config"]
    hub = {k: kwargs.get(k) for k in HUB_KWARGS if kwargs.get(k) is not None}
    found = find_gptq_config(path, config, hub) if path is not None else None
    if found is None:
        if backend != "auto":
            raise GPTQError(f"gptq_backend={backend!r} was given, but {path} is not a GPTQ checkpoint (its config.json "
                            f"has no quantization_config with quant_method gptq and there is no quantize_config.json)")
        return None
    qc, where = found
    if backend == "auto":
        # A quantization_config argument (transformers' GPTQConfig, as Q-LoRA passes) asks for transformers' path.
        wants_transformers = kwargs.get("quantization_config") is not None
        backend = "gptqmodel" if wants_transformers or gptqmodel_available() else "dequant"
    if backend == "gptqmodel":
        require_gptqmodel()
        config.quantization_config = {**qc, "quant_method": "gptq"}  # also for quantize_config.json-only folders
        if kwargs.get("dtype") is None and kwargs.get("torch_dtype") is None:
            # gptqmodel's kernels compute in fp16/bf16 only.
            kwargs["dtype"] = config.flag_dtype() or (torch.float16 if torch.cuda.is_available() else torch.bfloat16)
            if kwargs["dtype"] == torch.float32:
                kwargs["dtype"] = torch.bfloat16
        return None
    return load_gptq(cls, path, GPTQSettings.from_dict(qc, where), backend, kwargs)


def gptqmodel_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum"))


def require_gptqmodel() -> None:
    missing = [m for m in ("gptqmodel", "optimum") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"gptq_backend='gptqmodel' needs {' and '.join(missing)}, which is not installed. "
                          f"{QUANT_EXTRA_HINT}")


def load_gptq(cls, path, settings: GPTQSettings, backend: str, kwargs: dict[str, Any]):
    """Build ``cls`` (QWenLMHeadModel or QWenModel) from a GPTQ folder with plain PyTorch layers.

    ``backend`` "dequant": every quantized layer becomes an ``nn.Linear`` of the load dtype;
    "int8": an :class:`~qwen.quantize.Int8Linear`. Missing tensors are an error naming them.
    """
    from transformers import GenerationConfig

    from .. import chat as chat_utils
    from .layers import Int8Linear

    kwargs = dict(kwargs)
    config = kwargs.pop("config")
    hub = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    hub = {k: v for k, v in hub.items() if v is not None}
    dtype_arg = kwargs.pop("dtype", None)
    dtype_arg = kwargs.pop("torch_dtype", None) if dtype_arg is None else dtype_arg
    device = _device_of(kwargs.pop("device_map", None))
    attn = kwargs.pop("attn_implementation", None)
    want_info = kwargs.pop("output_loading_info", False)
    for harmless in ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "weights_only", "_from_auto",
                     "adapter_kwargs", "_commit_hash", "code_revision"):
        kwargs.pop(harmless, None)
    if kwargs:
        logger.warning("ignored for a GPTQ folder: %s", ", ".join(sorted(kwargs)))

    tensors = _Tensors(_weight_files(path, settings, hub))
    dtype = _dtype_of(dtype_arg, config, tensors)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the model built here holds plain weights
    config.dtype = dtype
    if attn is not None:
        config._attn_implementation = attn
    with torch.device("meta"):
        model = cls(config)
    prefix = "" if hasattr(model, "transformer") else model.base_model_prefix + "."
    missing: list[str] = []
    bits, v1 = settings.bits, settings.checkpoint_format == "gptq"

    def plain(key: str, shape: torch.Size) -> torch.Tensor | None:
        if key not in tensors:
            missing.append(key)
            return None
        t = tensors.get(key)
        if t.shape != shape:
            raise GPTQError(f"{path}: {key} has shape {list(t.shape)}, the config asks for {list(shape)}")
        return t.to(device=device, dtype=dtype)

    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, module in linears:
        key = prefix + name
        if key + ".qweight" not in tensors:
            weight = plain(key + ".weight", module.weight.shape)
            bias = plain(key + ".bias", module.bias.shape) if module.bias is not None else None
            if weight is not None:
                module.weight = nn.Parameter(weight)
            if bias is not None:
                module.bias = nn.Parameter(bias)
            continue
        parts = {}
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            if key + "." + part in tensors:
                parts[part] = tensors.get(f"{key}.{part}").to(device)
            elif part != "g_idx":
                missing.append(f"{key}.{part}")
        if not {"qweight", "qzeros", "scales"} <= parts.keys():
            continue
        bias = None
        if module.bias is not None:
            bias = plain(key + ".bias", module.bias.shape)
            if bias is None:
                continue
        elif key + ".bias" in tensors and bool(tensors.get(key + ".bias").any()):
            raise GPTQError(f"{path}: {key}.bias is non-zero, but this layer has no bias in the Qwen model")
        parent, _, child = name.rpartition(".")
        if backend == "int4":
            new = _int4_checked(path, key, parts, settings, module, v1, bias, dtype)
            setattr(model.get_submodule(parent) if parent else model, child, new)
            continue
        weight = _dequantize_checked(path, key, parts, settings, module, v1)
        if backend == "int8":
            new = Int8Linear(_linear_from(weight.to(dtype), bias))
            setattr(model.get_submodule(parent) if parent else model, child, new)
        else:
            module.weight = nn.Parameter(weight.to(dtype))
            if bias is not None:
                module.bias = nn.Parameter(bias)
        del weight

    for name, param in list(model.named_parameters()):
        owner = name.rpartition(".")[0]
        if param.device.type == "meta" and prefix + owner + ".qweight" not in tensors:  # else reported above
            t = plain(prefix + name, param.shape)
            if t is not None:
                pname = name.rpartition(".")[2]
                setattr(model.get_submodule(owner) if owner else model, pname, nn.Parameter(t))
    if missing:
        raise GPTQError(
            f"{path} lacks {len(missing)} tensors of this GPTQ Qwen model (e.g. {missing[:4]}): the checkpoint is "
            f"incomplete, or its config.json (layers, sizes) or GPTQ settings (bits {bits}) do not match the weights."
        )
    unused = sorted(set(tensors.where) - tensors.used)
    if unused:
        logger.warning("%s: %d tensors were not used (e.g. %s)", path, len(unused), unused[:3])
    model.eval()
    model.config._name_or_path = str(path)
    gen_file = resolve_file(path, "generation_config.json", hub)
    model.generation_config = (
        GenerationConfig.from_pretrained(gen_file.parent) if gen_file is not None
        else GenerationConfig(**chat_utils.CHAT_GENERATION_DEFAULTS)
    )
    model.gptq_settings = settings
    if want_info:
        info = {"missing_keys": [], "unexpected_keys": unused, "mismatched_keys": [], "error_msgs": []}
        return model, info
    return model


def _dequantize_checked(path, key: str, parts: dict[str, torch.Tensor], s: GPTQSettings, module: nn.Linear,
                        v1: bool) -> torch.Tensor:
    """Dequantize one layer after checking every shape against the module, with errors that name the cause."""
    g_idx = _checked_g_idx(path, key, parts, s, module)
    return dequantize(parts["qweight"], parts["qzeros"], parts["scales"], g_idx, s.bits, v1=v1)


def _int4_checked(path, key: str, parts: dict[str, torch.Tensor], s: GPTQSettings, module: nn.Linear, v1: bool,
                  bias: torch.Tensor | None, dtype: torch.dtype):
    """One 4-bit layer as an :class:`~qwen.quantize.Int4Linear` (its 4-bit values kept), after the checks
    of ``_dequantize_checked``; only for layers whose groups are consecutive input channels."""
    from .layers import Int4Linear

    g_idx = _checked_g_idx(path, key, parts, s, module)
    in_f = module.in_features
    groups = parts["scales"].shape[0]
    if s.bits != 4 or in_f % groups or not torch.equal(
        g_idx.long().cpu(), torch.arange(in_f) // (in_f // groups)
    ):
        raise GPTQError(
            f"{path}: gptq_backend='int4' keeps 4-bit layers whose groups are runs of input channels; {key} is "
            f"{s.bits}-bit{' with act-order (desc_act) groups' if s.bits == 4 else ''}. "
            "Use gptq_backend='int8' or 'dequant' for this folder."
        )
    q = unpack(parts["qweight"], 4, 0).t().to(torch.uint8).contiguous()  # [out, in]
    zeros = unpack(parts["qzeros"], 4, 1)[:, : module.out_features] + (1 if v1 else 0)
    return Int4Linear(q, parts["scales"].float().t(), zeros.float().t(), bias, dtype)


def _checked_g_idx(path, key: str, parts: dict[str, torch.Tensor], s: GPTQSettings, module: nn.Linear) -> torch.Tensor:
    """Check one packed layer's shapes against the module (errors name the cause); returns its g_idx."""
    out_f, in_f = module.out_features, module.in_features
    per = 32 // s.bits
    groups = 1 if s.group_size == -1 else math.ceil(in_f / s.group_size)
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    if tuple(qweight.shape) != (in_f // per, out_f) or in_f % per:
        raise GPTQError(
            f"{path}: {key}.qweight has shape {list(qweight.shape)}; {s.bits}-bit packing of a {in_f}->{out_f} layer "
            f"gives [{in_f // per}, {out_f}]. Check 'bits' in the GPTQ config and the model sizes in config.json."
        )
    g_idx = parts.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(in_f, device=qweight.device) // (s.group_size if s.group_size > 0 else in_f)
    n_groups = scales.shape[0]
    if tuple(scales.shape) != (n_groups, out_f) or tuple(qzeros.shape) != (n_groups, math.ceil(out_f / per)):
        raise GPTQError(
            f"{path}: {key} has scales {list(scales.shape)} and qzeros {list(qzeros.shape)}; "
            f"expected [groups, {out_f}] and [groups, {math.ceil(out_f / per)}]"
        )
    if n_groups != groups and not s.desc_act:
        logger.warning("%s: %s has %d groups, group_size %d implies %d", path, key, n_groups, s.group_size, groups)
    if tuple(g_idx.shape) != (in_f,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise GPTQError(f"{path}: {key}.g_idx must hold {in_f} group numbers in 0..{n_groups - 1}")
    return g_idx


