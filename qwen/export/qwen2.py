"""Export a Qwen v1 folder as a ``Qwen2ForCausalLM`` folder that plain transformers, vLLM and SGLang load.

Qwen2's block is Qwen v1's with q/k/v split out of the fused ``c_attn`` (qwen.convert holds the key
table). Tensors stream from the source shards into output shards of at most ``shard_size`` bytes, so
the model is never loaded. A GPTQ source is dequantized (the output is a float model of ``dtype``).
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig

from ..convert import qwen2_config, qwen2_key_map, qwen2_tensor
from ..tokenizer import ENDOFTEXT, IM_END, IM_START
from .rope import default_rope_scaling, rope_scaling
from .source import ExportError, ExportReport, Source, open_source
from .staging import check_destination, staged
from .tokenizer_json import fast_tokenizer, write_tokenizer_files

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_BYTES = 32 * 1024**2  # tokenizer.json and the small JSON files, with room to spare
# generation_config.json fields of the original that only qwen's chat code reads; the stops they carry
# become eos_token_id, the rest means nothing to other readers.
QWEN_ONLY_GENERATION_KEYS = ("chat_format", "max_window_size", "stop_words_ids")


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes (GB = 10^9, GiB = 2^30, as transformers reads
    ``max_shard_size``)."""
    if isinstance(text, int):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
        if not match:
            raise ExportError(f"--shard-size takes a size such as 5GB, 500MB or 2GiB, not {text!r}")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise ExportError(f"--shard-size must be positive, not {text!r}")
    return size


def export_qwen2(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str = "auto",
    shard_size: str | int = "5GB",
    rope: str | None = None,
    rope_factor: float | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Write ``dst``: config.json (Qwen2ForCausalLM), safetensors in Qwen2 key names (sharded with an index
    when larger than ``shard_size``), generation_config.json, tokenizer.json and tokenizer_config.json.

    ``dtype``: "auto" (the source's stored dtype), "bf16", "fp16" or "fp32". ``rope``: the rotary scaling
    past ``seq_length`` ("none", "dynamic", "yarn"; see qwen.export.rope; None: "dynamic" for models with
    dynamic NTK, "none" for those without), ``rope_factor`` its factor.
    Raises :class:`ExportError` (one line naming the problem and the fix) before writing anything when the
    source or DST is unusable; a failure while writing leaves DST as it was.
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    max_shard = parse_size(shard_size)
    dst = Path(dst).expanduser()
    source = open_source(src)
    check_destination(dst, source.folder, overwrite)
    seq_length = source.config.seq_length
    rope = rope or default_rope_scaling(source.config.use_dynamic_ntk)
    try:
        scaling = rope_scaling(rope, seq_length, rope_factor)
        config = qwen2_config(source.config, rope_parameters=scaling.rope_parameters,
                              max_position_embeddings=scaling.max_position_embeddings)
    except ValueError as exc:  # an unknown rope choice or factor; several window sizes (SlidingWindowError)
        raise ExportError(str(exc)) from None
    out_dtype = DTYPES[dtype] or source.stored_dtype()
    keys = qwen2_key_map(source.config.num_hidden_layers)
    shapes = source.shapes
    sizes = {k: math.prod(shapes[src_key]) // (3 if part is not None else 1) * out_dtype.itemsize
             for k, (src_key, part) in keys.items()}
    shards = _plan_shards(sizes, max_shard)
    tokenizer = source.tokenizer()
    chat = source.is_chat()
    generation, generation_notes = qwen2_generation_config(source.generation_config(), chat, tokenizer.special_tokens)
    config.dtype = out_dtype
    config.eos_token_id = tokenizer.special_tokens[IM_END if chat else ENDOFTEXT]
    config.pad_token_id = tokenizer.special_tokens[ENDOFTEXT]

    report = ExportReport(dst, [f"Qwen2ForCausalLM, {str(out_dtype).removeprefix('torch.')}, {len(shards)} "
                                f"safetensors shard(s), fast tokenizer ({'chat' if chat else 'base'} model)"])
    if source.gptq is not None:
        report.notes.append(f"GPTQ source ({source.gptq.bits}-bit): exported dequantized, as a "
                            f"{str(out_dtype).removeprefix('torch.')} model (outputs equal qwen's dequantized load)")
    report.notes.append(scaling.describe(seq_length, source.config.use_dynamic_ntk, source.config.use_logn_attn))
    report.notes += generation_notes
    with staged(dst, sum(sizes.values()) + TOKENIZER_BYTES) as temp:
        _write_shards(source, keys, shards, out_dtype, temp)
        _write_config(config, scaling.rope_parameters, temp)
        generation.to_json_file(temp / "generation_config.json")
        write_tokenizer_files(temp, tokenizer, fast_tokenizer(tokenizer), chat=chat, model_max_length=seq_length)
    return report


def qwen2_generation_config(original: dict[str, Any], chat: bool,
                            special_tokens: dict[str, int]) -> tuple[GenerationConfig, list[str]]:
    """The source's generation settings for readers that know only transformers' fields: the stop words
    become ``eos_token_id`` (a chat model stops at ``<|im_end|>``, ``<|im_start|>`` and ``<|endoftext|>``),
    sampling settings are kept. Multi-token stop sequences cannot be ids: they are reported, not kept."""
    eos = original.get("eos_token_id", special_tokens[ENDOFTEXT])
    stops = list(eos) if isinstance(eos, list) else [eos]
    if chat:
        stops += [special_tokens[IM_END], special_tokens[IM_START]]
    notes = []
    for seq in original.get("stop_words_ids") or []:
        if len(seq) == 1:
            stops.append(seq[0])
        else:
            notes.append(f"generation_config.json stop sequence {seq} has several tokens; plain transformers stops "
                         f"on single ids only: pass it as stop_strings (or stop= in vLLM) when generating")
    settings = {k: v for k, v in original.items() if k not in QWEN_ONLY_GENERATION_KEYS}
    settings["eos_token_id"] = list(dict.fromkeys(int(s) for s in stops))
    settings.setdefault("pad_token_id", special_tokens[ENDOFTEXT])
    settings.pop("transformers_version", None)
    return GenerationConfig(**settings), notes


def _plan_shards(sizes: dict[str, int], max_shard: int) -> list[list[str]]:
    """Keys grouped in order into shards of at most ``max_shard`` bytes (a larger tensor gets a shard alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _write_shards(source: Source, keys: dict[str, tuple[str, int | None]], shards: list[list[str]],
                  dtype: torch.dtype, out: Path) -> None:
    """One shard in memory at a time; transformers' names (model-0000i-of-0000n.safetensors + index)."""
    get = lru_cache(maxsize=2)(source.tensor)  # c_attn's weight and bias feed three tensors each
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map, total = {}, 0
    for name, group in zip(names, shards, strict=True):
        tensors = {}
        for key in group:
            src_key, part = keys[key]
            tensors[key] = qwen2_tensor(get, src_key, part).to(dtype).contiguous()
            total += tensors[key].numel() * tensors[key].element_size()
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_config(config, rope_parameters: dict, out: Path) -> None:
    """config.json as transformers 5 writes it, plus the transformers 4.x names of the same settings
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``), which vLLM/SGLang builds on transformers 4 read."""
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(out)
    path = out / "config.json"
    data = json.loads(path.read_text())
    data.setdefault("rope_theta", config.rope_parameters["rope_theta"])
    if rope_parameters.get("rope_type", "default") != "default":
        data.setdefault("rope_scaling", {**rope_parameters, "type": rope_parameters["rope_type"]})
    data.setdefault("torch_dtype", data.get("dtype"))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
