"""The GPTQ file format of the -Int4/-Int8 folders: packing, settings, and where a folder keeps them.

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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SUPPORTED_BITS = (2, 4, 8)
QUANT_EXTRA_HINT = (
    'Install the quant extra: pip install -e ".[quant]" (from a checkout; pip install "qwen[quant]" otherwise). '
    "It costs a CUDA build of PyTorch: gptqmodel 7.x requires torch>=2.14.1, so pip replaces a CPU-only torch "
    "with the CUDA 13 build and its NVIDIA libraries, about 3.1 GB of downloads and 6 GB installed. Without it, "
    "gptq_backend='dequant' (the default) or 'int8' load the same folder in plain PyTorch."
)
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")


class GPTQError(ValueError):
    """A GPTQ folder or setting this package cannot use; the message says what to do."""


# ----- packing ------------------------------------------------------------------------------------


def pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack integers in 0..2^bits-1 into int32 words along ``dim`` (32 // bits per word, low bits first).

    Values are masked to ``bits`` bits, as AutoGPTQ's packer does through its uint32 arithmetic.
    """
    per = values_per_word(bits)
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
    per = values_per_word(bits)
    w = words.to(torch.int32).movedim(dim, -1)
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=w.device)
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then mask: the low bits are exact
    return v.reshape(*w.shape[:-1], w.shape[-1] * per).movedim(-1, dim)


def values_per_word(bits: int) -> int:
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


def resolve_file(path: str | Path, filename: str, hub: dict[str, Any]) -> Path | None:
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
        config_file = resolve_file(path, "config.json", hub)
        if config_file is not None:
            qc = json.loads(config_file.read_text()).get("quantization_config")
    if qc is not None:
        qc = qc.to_dict() if hasattr(qc, "to_dict") else dict(qc)
        # AutoGPTQ-era exports may lack quant_method; bits + group_size are GPTQ's own fields.
        method = str(qc.get("quant_method") or ("gptq" if {"bits", "group_size"} <= qc.keys() else "")).lower()
        return (qc, f"{path}/config.json quantization_config") if method == "gptq" else None
    found = resolve_file(path, "quantize_config.json", hub)
    if found is None:
        return None
    qc = json.loads(found.read_text())
    if str(qc.get("quant_method", "gptq")).lower() != "gptq":
        return None
    return qc, str(found)


