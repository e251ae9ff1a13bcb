"""GPTQ checkpoints (the -Int4/-Int8 folders): load them in pure PyTorch, and make them (``run_gptq.py``).

The original toolchain (auto-gptq + optimum) no longer imports on current transformers, and
gptqmodel needs a CUDA build of torch. This module reads and writes the same folders without them.

Packed layout of one quantized ``nn.Linear`` (``in`` -> ``out`` features; AutoGPTQ's "v1" format,
``bits`` 2, 4 or 8, ``pack = 32 // bits`` values per int32 word, lowest bits first):

* ``qweight`` int32 ``[in / pack, out]``: q[i, o] in 0..2^bits-1, packed along the input dim;
* ``qzeros``  int32 ``[groups, out / pack]``: zero points packed along the output dim. The v1 format
  (``checkpoint_format: "gptq"``, every released Qwen folder) stores zero - 1; gptqmodel's internal
  ``"gptq_v2"`` stores zero itself;
* ``scales``  fp16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input channel
  (``i // group_size``, or a permutation of it when the model was quantized with act-order, desc_act);
* ``bias`` fp16 ``[out]`` for layers that have one (c_attn).

``W[o, i] = scales[g, o] * (q[i, o] - zero[g, o])`` with ``g = g_idx[i]``. In a Qwen folder every
Linear inside the blocks (attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj) is stored this way;
wte, the norms and lm_head are plain fp16 tensors.

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

Making a folder (``python run_gptq.py --model_name_or_path ... --data_path ... --out_path ...``) runs
the GPTQ algorithm layer by layer on calibration conversations: see :func:`quantize_model`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 4, 8)
BACKENDS = ("auto", "dequant", "int8", "int4", "gptqmodel")
# true_sequential: each step's inputs are taken after the steps before it were quantized.
SEQUENTIAL_STEPS = (("attn.c_attn",), ("attn.c_proj",), ("mlp.w1", "mlp.w2"), ("mlp.c_proj",))
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
QUANT_EXTRA_HINT = (
    'Install the quant extra: pip install -e ".[quant]" (from a checkout; pip install "qwen[quant]" otherwise). '
    "It costs a CUDA build of PyTorch: gptqmodel 7.x requires torch>=2.14.1, so pip replaces a CPU-only torch "
    "with the CUDA 13 build and its NVIDIA libraries, about 3.1 GB of downloads and 6 GB installed. Without it, "
    "gptq_backend='dequant' (the default) or 'int8' load the same folder in plain PyTorch."
)


class GPTQError(ValueError):
    """A GPTQ folder or setting this module cannot use; the message says what to do."""


# ----- packing ------------------------------------------------------------------------------------


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in 0..2^bits-1 into int32 words along ``dim`` (32 // bits per word, low bits first).

    Values are masked to ``bits`` bits, as AutoGPTQ's packer does through its uint32 arithmetic.
    """
    per = _per_word(bits)
    v = values.to(torch.int64).movedim(dim, -1) & ((1 << bits) - 1)
    if v.shape[-1] % per:
        raise GPTQError(f"cannot pack {v.shape[-1]} values of {bits} bits into int32 words ({per} per word)")
    v = v.reshape(*v.shape[:-1], v.shape[-1] // per, per)
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=v.device)
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # reinterpret as signed
    return words.movedim(-1, dim).contiguous()


def unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> int32 values in 0..2^bits-1 (``dim`` grows 32 // bits times)."""
    per = _per_word(bits)
    w = words.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device)
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then mask: the low bits are exact
    return v.reshape(*w.shape[:-1], w.shape[-1] * per).movedim(-1, dim)


def _per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise GPTQError(f"{bits}-bit GPTQ is not supported here (supported: {', '.join(map(str, SUPPORTED_BITS))})")
    return 32 // bits


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    *,
    v1: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[out, in]`` weight of one packed layer: ``scales[g, o] * (q[i, o] - zero[g, o])``, g = g_idx[i].

    ``v1``: qzeros hold zero - 1 (AutoGPTQ's format); the +1 is applied without masking, as its
    kernels do.
    """
    q = unpack(qweight, bits, 0)  # [in, out]
    zeros = unpack(qzeros, bits, 1)[:, : q.shape[1]]  # [groups, out]
    if v1:
        zeros = zeros + 1
    g = g_idx.to(device=q.device, dtype=torch.long)
    w = (q - zeros[g]).to(torch.float32).mul_(scales.to(device=q.device, dtype=torch.float32)[g])
    return w.t().contiguous().to(dtype)


def pack_layer(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor, bits: int,
               bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One layer's tensors in the v1 layout from ``q`` [out, in], ``scales``/``zeros`` [groups, out], ``g_idx`` [in]."""
    tensors = {
        "qweight": pack(q.t(), bits, 0),
        "qzeros": pack(zeros.to(torch.int64) - 1, bits, 1),  # v1 stores zero - 1
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }
    if bias is not None:
        tensors["bias"] = bias.detach().to(torch.float16).contiguous()
    return tensors


def dequantize_layer(tensors: dict[str, torch.Tensor], bits: int, *, v1: bool = True,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits, v1=v1,
                      dtype=dtype)


# ----- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQSettings:
    """What the loader needs from ``quantization_config`` / ``quantize_config.json``."""

    bits: int
    group_size: int
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    model_file_base_name: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> GPTQSettings:
        method = str(d.get("quant_method", "gptq")).lower()
        if method != "gptq":
            raise GPTQError(f"{where}: quant_method {method!r} is not GPTQ")
        bits = d.get("bits")
        if bits not in SUPPORTED_BITS:
            raise GPTQError(
                f"{where}: bits {bits!r} is not supported by the plain-PyTorch GPTQ loader (it reads "
                f"{', '.join(map(str, SUPPORTED_BITS))}-bit folders; Qwen's are 4 and 8). For other widths load with "
                f"gptq_backend='gptqmodel'. {QUANT_EXTRA_HINT}"
            )
        group_size = d.get("group_size", 128)
        if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
            raise GPTQError(f"{where}: group_size {group_size!r} must be a positive integer or -1 (one group)")
        fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise GPTQError(
                f"{where}: checkpoint_format {fmt!r} is not read here (the loader reads 'gptq', AutoGPTQ's layout of "
                f"the released Qwen folders, and 'gptq_v2'); load it with gptq_backend='gptqmodel'"
            )
        return cls(
            bits=bits,
            group_size=group_size,
            desc_act=bool(d.get("desc_act", False)),
            sym=bool(d.get("sym", True)),
            checkpoint_format=fmt,
            model_file_base_name=d.get("model_file_base_name"),
        )

    def to_dict(self, damp_percent: float = 0.01, true_sequential: bool = True) -> dict[str, Any]:
        """quantize_config.json as AutoGPTQ 0.7 writes it (also config.json's quantization_config)."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": damp_percent,
            "desc_act": self.desc_act,
            "static_groups": False,
            "sym": self.sym,
            "true_sequential": true_sequential,
            "model_name_or_path": None,
            "model_file_base_name": self.model_file_base_name or "model",
            "quant_method": "gptq",
            "checkpoint_format": self.checkpoint_format,
        }


def _resolve(path: str | Path, filename: str, hub: dict[str, Any]) -> Path | None:
    """A file of a checkpoint folder (local, or a Hub repo through the local cache), or None if absent."""
    local = Path(str(path))
    if local.is_dir():
        sub = hub.get("subfolder") or ""
        found = local / sub / filename
        return found if found.is_file() else None
    from transformers.utils import cached_file

    try:
        found = cached_file(
            str(path), filename, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False, **{k: v for k, v in hub.items() if v is not None},
        )
    except OSError:
        return None
    return Path(found) if found else None


def find_gptq_config(path: str | Path, config=None, hub: dict[str, Any] | None = None) -> tuple[dict, str] | None:
    """The GPTQ settings of a checkpoint and where they were found, or None for an unquantized folder.

    config.json's ``quantization_config`` (quant_method gptq) wins; else a ``quantize_config.json``
    beside it (AutoGPTQ's file, which has no quant_method). Other quantization methods return None
    and are left to transformers.
    """
    hub = hub or {}
    qc = getattr(config, "quantization_config", None) if config is not None else None
    if qc is None and config is None:
        config_file = _resolve(path, "config.json", hub)
        if config_file is not None:
            qc = json.loads(config_file.read_text()).get("quantization_config")
    if qc is not None:
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
        # AutoGPTQ-era exports may lack quant_method; bits + group_size are GPTQ's own fields.
        method = str(qc.get("quant_method") or ("gptq" if {"bits", "group_size"} <= qc.keys() else "")).lower()
        return (qc, f"{path}/config.json quantization_config") if method == "gptq" else None
    found = _resolve(path, "quantize_config.json", hub)
    if found is None:
        return None
    qc = json.loads(found.read_text())
    if str(qc.get("quant_method", "gptq")).lower() != "gptq":
        return None
    return qc, str(found)


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
        found = _resolve(path, index, hub)
        if found is not None:
            shards = sorted(set(json.loads(found.read_text())["weight_map"].values()))
            files = [_resolve(path, s, hub) for s in shards]
            missing = [s for s, f in zip(shards, files, strict=True) if f is None]
            if missing:
                raise GPTQError(f"{path}: {index} names weight files that are missing: {missing}")
            return files
    for name in [f"{b}.safetensors" for b in bases] + [f"{b}.bin" for b in bases] + ["pytorch_model.bin"]:
        found = _resolve(path, name, hub)
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
    from .modeling import _default_dtype

    return config.flag_dtype() or _default_dtype()


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

    from . import chat as chat_utils
    from .quantize import Int8Linear

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
    gen_file = _resolve(path, "generation_config.json", hub)
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
    from .quantize import Int4Linear

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


# ----- the GPTQ algorithm -------------------------------------------------------------------------


class Hessian:
    """H = 2/N * sum over samples of X^T X for one layer's inputs (a running mean, as AutoGPTQ keeps it)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        x = x * math.sqrt(2 / self.samples)
        self.H.addmm_(x.t(), x)


def _grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w`` [out, n] (AutoGPTQ's Quantizer.find_params, per channel).

    The scale is rounded to fp16 first, so the packed folder dequantizes to exactly the values the
    error propagation assumed.
    """
    maxq = 2**bits - 1
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(flat, -1.0, xmin), torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


@dataclass
class QuantizedWeight:
    q: torch.Tensor  # [out, in] integers in 0..2^bits-1
    scales: torch.Tensor  # [groups, out] (fp16 values)
    zeros: torch.Tensor  # [groups, out] integers
    g_idx: torch.Tensor  # [in]


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    sym: bool = True,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] with GPTQ (Frantar et al. 2022) given the Hessian ``H`` [in, in] of its inputs.

    Columns are quantized in order (largest diag(H) first with ``desc_act``) and each one's rounding
    error is spread over the columns not yet quantized through the Cholesky factor of H^-1, in
    blocks of ``block_size`` columns. A group's scale and zero point are taken when the loop
    reaches its first column, from the weights as updated so far. ``sym``: zero = 2^(bits-1).
    Asymmetric zero points are kept >= 1 because the v1 format stores zero - 1.
    """
    W = weight.detach().to(torch.float32).clone()
    out_f, in_f = W.shape
    H = H.to(W.device, torch.float32).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, damp_percent)
    gs = group_size if group_size > 0 else in_f
    n_groups = math.ceil(in_f / gs)
    scales = torch.zeros(n_groups, out_f, device=W.device)
    zeros = torch.zeros(n_groups, out_f, device=W.device)
    Q = torch.zeros(out_f, in_f, dtype=torch.int32, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with _one_thread(W.device):
            _quantize_block(W, W1, Err1, Hinv1, Q, scales, zeros, i1, i2, gs, bits, sym)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    g_idx = torch.arange(in_f, device=W.device) // gs
    if perm is not None:
        inverse = torch.argsort(perm)
        Q, g_idx = Q[:, inverse], g_idx[inverse]
    return QuantizedWeight(Q, scales, zeros.to(torch.int32), g_idx.to(torch.int32))


def _quantize_block(W, W1, Err1, Hinv1, Q, scales, zeros, i1: int, i2: int, gs: int, bits: int, sym: bool) -> None:
    """Quantize columns i1..i2 one by one (W1 = W[:, i1:i2], updated in place), spreading each error
    over the block's later columns; record the errors in Err1 for the update of the columns after it."""
    maxq = 2**bits - 1
    scale = scales[(i1 - 1) // gs] if i1 % gs else None
    zero = zeros[(i1 - 1) // gs] if i1 % gs else None
    for i in range(i2 - i1):
        col = i1 + i
        if col % gs == 0:
            g = col // gs
            span = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
            scale, zero = _grid(span, bits, sym)
            scales[g], zeros[g] = scale, zero
        w = W1[:, i]
        q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
        Q[:, col] = q.to(torch.int32)
        err = (w - scale * (q - zero)) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err


class _one_thread:
    """Run a CPU loop of many small tensor ops on one thread: with several, each tiny op pays a
    thread-pool round trip (25x slower on a busy 2-core machine). No effect on GPU tensors."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = device.type == "cpu"

    def __enter__(self) -> None:
        if self.cpu:
            self.threads = torch.get_num_threads()
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        if self.cpu:
            torch.set_num_threads(self.threads)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; the damping grows tenfold if H is not
    positive definite (too little calibration data for the layer's width)."""
    idx = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    damp = damp_percent
    for _ in range(5):
        Hd = H.clone()
        Hd[idx, idx] += damp * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                if damp != damp_percent:
                    logger.warning("GPTQ: Hessian needed damp %.3g instead of %.3g", damp, damp_percent)
                return U
        damp *= 10
    raise GPTQError("GPTQ: the Hessian is not positive definite even with heavy damping; use more calibration data")


def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest with the same grid as GPTQ (the baseline GPTQ improves on)."""
    W = weight.detach().float()
    out_f, in_f = W.shape
    gs = group_size if group_size > 0 else in_f
    scales, zeros, qs = [], [], []
    for g0 in range(0, in_f, gs):
        scale, zero = _grid(W[:, g0 : g0 + gs], bits, sym)
        q = torch.clamp(torch.round(W[:, g0 : g0 + gs] / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        scales.append(scale)
        zeros.append(zero)
        qs.append(q)
    g_idx = torch.arange(in_f) // gs
    return QuantizedWeight(torch.cat(qs, 1).int(), torch.stack(scales), torch.stack(zeros).int(), g_idx.int())


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed inputs were seen."""


def _collect_hessians(block, modules: dict[str, nn.Linear], states, rest, device) -> dict[str, Hessian]:
    """Run ``block`` on every sample and accumulate H of each module's inputs; a pass stops as soon as
    every module has seen its input."""
    hessians = {n: Hessian(m.in_features, device) for n, m in modules.items()}
    seen: set[str] = set()

    def hook(name: str):
        def record(module, inputs, output):
            hessians[name].add(inputs[0])
            seen.add(name)
            if len(seen) == len(modules):
                raise _Stop

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for h, (args, kwargs) in zip(states, rest, strict=True):
            seen.clear()
            try:
                block(h, *args, **kwargs)
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return hessians


@torch.no_grad()
def quantize_model(
    model,
    samples: Sequence[Sequence[int]],
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    true_sequential: bool = True,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """Quantize every Linear inside the blocks of a QWenLMHeadModel with GPTQ; return the packed tensors.

    Layer by layer: the block's inputs for every calibration sample (batch 1, as the original ran)
    are captured; for each step of ``SEQUENTIAL_STEPS`` (attn.c_attn; attn.c_proj; mlp.w1 + mlp.w2;
    mlp.c_proj) the inputs of its layers are accumulated into H, and each layer is quantized and
    its weight replaced by the dequantized result, so later steps see the quantized earlier ones;
    then the block is run again to give the next block its inputs. Blocks move to ``device`` one at
    a time (the rest of the model stays where it is). Returns ``{"transformer.h.{i}.attn.c_attn":
    {"qweight", "qzeros", "scales", "g_idx", "bias"?}, ...}`` in the v1 layout.
    """
    from tqdm.auto import tqdm

    _per_word(bits)
    blocks = model.transformer.h
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.transformer.wte.to(device)

    states, rest = [], []

    def capture(module, args, kwargs):
        states.append(args[0])
        rest.append((args[1:], kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids in samples:
            try:
                model.transformer(input_ids=torch.tensor([list(ids)], device=device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not states:
        raise GPTQError("GPTQ needs at least one calibration sample")

    packed: dict[str, dict[str, torch.Tensor]] = {}
    steps = SEQUENTIAL_STEPS if true_sequential else (tuple(n for s in SEQUENTIAL_STEPS for n in s),)
    bar = tqdm(total=len(blocks) * sum(len(s) for s in steps), desc="GPTQ", unit="layer", disable=not progress)
    for index, block in enumerate(blocks):
        block.to(device)
        for names in steps:
            modules = {n: block.get_submodule(n) for n in names}
            hessians = _collect_hessians(block, modules, states, rest, device)
            for name, module in modules.items():
                bar.set_postfix_str(f"block {index} {name}")
                result = gptq_quantize_weight(module.weight, hessians[name].H, bits, group_size, damp_percent, desc_act)
                tensors = pack_layer(result.q, result.scales, result.zeros, result.g_idx, bits, module.bias)
                module.weight.data = dequantize_layer(tensors, bits, dtype=module.weight.dtype)
                packed[f"transformer.h.{index}.{name}"] = {k: v.cpu() for k, v in tensors.items()}
                bar.update()
            del hessians
        if index + 1 < len(blocks):
            states = [block(h, *args, **kwargs) for h, (args, kwargs) in zip(states, rest, strict=True)]
        block.to(home)
    bar.close()
    model.transformer.wte.to(home)
    return packed


# ----- writing a folder ---------------------------------------------------------------------------

# Files copied from the source folder beside the weights: tokenizer, generation config, and the
# original remote code (the original tools load a folder through it).
_COPIED = ("qwen.tiktoken", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
_COPIED_SUFFIXES = (".py", ".cu", ".cpp", ".h")


def save_gptq_folder(
    model,
    packed: dict[str, dict[str, torch.Tensor]],
    out_path: str | Path,
    settings: GPTQSettings,
    source: str | Path | None = None,
    damp_percent: float = 0.01,
    true_sequential: bool = True,
    max_shard_size: str = "4GB",
) -> Path:
    """Write a GPTQ folder in the layout of the released -Int4/-Int8 checkpoints.

    Packed layers keep their original key names (``transformer.h.{i}.attn.c_attn.qweight`` ...);
    every other tensor is stored as fp16. config.json is the source's own (remote-code auto_map and
    all) plus ``quantization_config``; quantize_config.json carries the same settings for AutoGPTQ.
    """
    from huggingface_hub import save_torch_state_dict

    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        module = name.rpartition(".")[0]
        if module not in packed:
            state[name] = t.detach().to("cpu", torch.float16).contiguous()
    for module, tensors in packed.items():
        state.update({f"{module}.{k}": v for k, v in tensors.items()})
    for old in list(out.glob("model*.safetensors")) + list(out.glob("model.safetensors.index.json")):
        old.unlink()
    save_torch_state_dict(state, out, max_shard_size=max_shard_size, metadata={"format": "pt"})

    qc = settings.to_dict(damp_percent, true_sequential)
    src = Path(source) if source is not None and Path(source).is_dir() else None
    if src is not None and (src / "config.json").is_file():
        config = json.loads((src / "config.json").read_text())
    else:
        config = model.config.to_dict()
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "quantize_config.json").write_text(json.dumps({k: v for k, v in qc.items()}, indent=2))
    if src is not None:
        for f in src.iterdir():
            if f.is_file() and (f.name in _COPIED or f.suffix in _COPIED_SUFFIXES):
                shutil.copyfile(f, out / f.name)
    if not (out / "generation_config.json").is_file():
        model.generation_config.to_json_file(out / "generation_config.json")
    return out


def calibration_samples(
    data_path: str | Path, tokenizer, max_len: int, num_samples: int | None = None
) -> list[list[int]]:
    """Token ids of the fine-tune-format conversations in ``data_path`` as ChatML (system block first),
    cut to ``max_len``, as the original run_gptq.py prepared them."""
    from .finetune_data import DEFAULT_SYSTEM, encode_conversation, load_conversations

    samples = load_conversations(data_path)[:num_samples]
    ids = [encode_conversation(tokenizer, s["conversations"], s.get("system", DEFAULT_SYSTEM))[0] for s in samples]
    return [x[:max_len] for x in ids if x]


def quantize_folder(
    model_name_or_path: str | Path,
    samples: Sequence[Sequence[int]],
    out_path: str | Path,
    bits: int = 4,
    group_size: int = 128,
    damp_percent: float = 0.01,
    desc_act: bool = False,
    true_sequential: bool = True,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> Path:
    """Load an unquantized Qwen folder, quantize it with GPTQ on ``samples`` and write the GPTQ folder."""
    from transformers import AutoModelForCausalLM

    from . import QWenLMHeadModel

    if find_gptq_config(model_name_or_path) is not None:
        raise GPTQError(f"{model_name_or_path} is already a GPTQ checkpoint; quantize the unquantized model instead")
    if group_size != -1 and group_size <= 0:
        raise GPTQError(f"--group-size must be positive or -1, got {group_size}")
    settings = GPTQSettings(bits=bits, group_size=group_size, desc_act=desc_act, sym=True, model_file_base_name="model")
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
    if not isinstance(model, QWenLMHeadModel):
        raise GPTQError(f"{model_name_or_path} is not a Qwen v1 checkpoint")
    model.eval()
    packed = quantize_model(model, samples, bits, group_size, damp_percent, desc_act, true_sequential, device, progress)
    source = Path(str(model_name_or_path))
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(str(model_name_or_path)))
    return save_gptq_folder(model, packed, out_path, settings, source, damp_percent, true_sequential)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="run_gptq.py",
        description="Quantize a Qwen v1 checkpoint to GPTQ Int4/Int8 (the -Int4/-Int8 folder layout) with "
        "calibration conversations in the fine-tune data format. Pure PyTorch: CPU or one GPU.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="unquantized Qwen folder (or Hub id in the cache)")
    parser.add_argument("--data_path", required=True,
                        help='calibration data: JSON list of {"id", "conversations": [{"from", "value"}, ...]}')
    parser.add_argument("--out_path", required=True, help="folder to write")
    parser.add_argument("--max_len", type=int, default=8192, help="cut each calibration sample to this many tokens")
    parser.add_argument("--bits", type=int, default=4, choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", "--group_size", dest="group_size", type=int, default=128,
                        help="input channels per scale/zero (-1: one group per row)")
    parser.add_argument("--damp_percent", type=float, default=0.01, help="dampening of H, a fraction of mean(diag H)")
    parser.add_argument("--desc_act", action="store_true",
                        help="act-order: quantize columns by decreasing Hessian diagonal (the original used false)")
    parser.add_argument("--num_samples", type=int, default=None, help="use only the first N samples of the data")
    parser.add_argument("--device", default=None,
                        help="where blocks are quantized (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="load dtype for the calibration forward passes (default: the checkpoint's rule)")
    args = parser.parse_args(argv)
    if args.max_len <= 0:
        parser.error("--max_len must be positive")

    from transformers import AutoTokenizer

    import qwen  # noqa: F401  (registers the Auto classes)

    start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    try:
        samples = calibration_samples(args.data_path, tokenizer, args.max_len, args.num_samples)
    except ValueError as exc:
        parser.exit(2, f"run_gptq.py: error: {exc}\n")
    tokens = sum(len(s) for s in samples)
    print(f"calibration: {len(samples)} samples, {tokens} tokens (max_len {args.max_len}); device {device}")
    try:
        out = quantize_folder(
            args.model_name_or_path, samples, args.out_path, args.bits, args.group_size, args.damp_percent,
            args.desc_act, True, device, getattr(torch, args.dtype) if args.dtype else None,
        )
    except GPTQError as exc:
        parser.exit(2, f"run_gptq.py: error: {exc}\n")
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.bits}-bit GPTQ (group size {args.group_size}) to {out}: {size / 2**20:.1f} MiB of weights "
          f"in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
