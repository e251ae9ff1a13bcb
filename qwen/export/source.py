"""The checkpoint being exported: an original Qwen v1 folder (plain or GPTQ), read one tensor at a time.

Exports never load the model: they stream tensors from the weight files into the output, so a 72B
folder converts with about one shard of memory. Everything wrong with the folder (not Qwen, missing
shards or tensors, sizes that do not match config.json) is found here, before anything is written,
and reported as an :class:`ExportError` whose one-line message names the problem and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from ..chat import CHAT_GENERATION_DEFAULTS
from ..config import QWenConfig
from ..gptq import GPTQError, GPTQSettings, dequantize, find_gptq_config
from ..loading import CheckpointNotFoundError, checkpoint_folder
from ..tiny import weight_shapes
from ..tokenizer import QWenTokenizer, VocabFileError

BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
GPTQ_PARTS = ("qweight", "qzeros", "scales")


class ExportError(ValueError):
    """An export that cannot be done; the message is one line naming the problem and the fix."""


@dataclass
class ExportReport:
    """What an export wrote, and what its user should know about it (the CLI prints the notes)."""

    path: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class Source:
    """An opened checkpoint folder: its config, GPTQ settings (None if unquantized) and weight files."""

    folder: Path
    config: QWenConfig
    gptq: GPTQSettings | None
    files: list[Path]
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Original key -> shape of every (dequantized) tensor of the model, in the original order."""
        return weight_shapes(self.config.to_dict())

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (original name) as stored; a GPTQ layer's ``.weight`` dequantized to float32."""
        module = key.removesuffix(".weight")
        if self.gptq is not None and module + ".qweight" in self._handles:
            parts = {p: self._get(f"{module}.{p}") for p in (*GPTQ_PARTS, "g_idx") if f"{module}.{p}" in self._handles}
            if "g_idx" not in parts:
                gs = self.gptq.group_size if self.gptq.group_size > 0 else self.shapes[key][1]
                parts["g_idx"] = torch.arange(self.shapes[key][1]) // gs
            try:
                weight = dequantize(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], self.gptq.bits,
                                    v1=self.gptq.checkpoint_format == "gptq")
            except (RuntimeError, IndexError) as exc:
                raise ExportError(f"{self.folder}: the GPTQ tensors of {module} do not fit {self.gptq.bits}-bit "
                                  f"packing of the sizes in config.json ({exc}); the folder is damaged") from None
        else:
            weight = self._get(key)
        if tuple(weight.shape) != self.shapes[key]:
            raise ExportError(f"{self.folder}: {key} has shape {list(weight.shape)}, but config.json implies "
                              f"{list(self.shapes[key])}; the config does not belong to these weights")
        return weight

    def stored_dtype(self) -> torch.dtype:
        """The dtype the folder keeps its float tensors in (fp16 for GPTQ folders' unquantized tensors)."""
        return self._get("transformer.ln_f.weight").dtype

    def tokenizer(self) -> QWenTokenizer:
        """The folder's tokenizer (its qwen.tiktoken and extra vocabulary, else the copy shipped with qwen)."""
        try:
            return QWenTokenizer.from_pretrained(self.folder)
        except VocabFileError as exc:
            raise ExportError(str(exc)) from None

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json as the folder has it (the original chat defaults when it has none)."""
        path = self.folder / "generation_config.json"
        return json.loads(path.read_text()) if path.is_file() else dict(CHAT_GENERATION_DEFAULTS)

    def is_chat(self) -> bool:
        """A -Chat model (ChatML turns end at <|im_end|>), not a base model (chat_format raw)."""
        return self.generation_config().get("chat_format", "chatml") == "chatml"

    def _get(self, key: str) -> torch.Tensor:
        handle = self._handles[key]
        return handle[key] if isinstance(handle, dict) else handle.get_tensor(key)


def open_source(path: str | Path) -> Source:
    """Open a Qwen v1 checkpoint folder for export, checking it completely before anything is written."""
    try:
        folder = checkpoint_folder(path)
    except CheckpointNotFoundError as exc:
        raise ExportError(str(exc)) from None
    raw = _read_json(folder / "config.json")
    if raw.get("model_type") != "qwen":
        raise ExportError(
            f"{folder} is not an original Qwen v1 checkpoint: its config.json says model_type "
            f"{raw.get('model_type')!r}, not 'qwen'. Export reads Qwen v1 folders (Qwen-7B, Qwen-7B-Chat, -Int4...)."
        )
    try:
        config = QWenConfig.from_dict(raw)
        found = find_gptq_config(folder)
        gptq = GPTQSettings.from_dict(*found) if found else None
    except (ValueError, GPTQError) as exc:
        raise ExportError(f"{folder}/config.json: {exc}") from None
    source = Source(folder, config, gptq, _weight_files(folder, gptq))
    _open_files(source)
    _check_complete(source)
    return source


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} cannot be read as JSON ({exc}); restore it from the original download") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} is not a JSON object; restore the file from the original download")
    return data


def _weight_files(folder: Path, gptq: GPTQSettings | None) -> list[Path]:
    """The weight files, from the index when there is one: a shard it names that is missing is an error."""
    bases = ["model"]
    if gptq is not None:
        bases = list(dict.fromkeys([gptq.model_file_base_name or "model", "model",
                                    f"gptq_model-{gptq.bits}bit-{gptq.group_size}g"]))
    indexes = [f"{b}.safetensors.index.json" for b in bases] + ["pytorch_model.bin.index.json"]
    for name in indexes:
        index = folder / name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ExportError(f"{index} has no weight_map; restore the file from the original download")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                raise ExportError(f"{folder}: {name} lists {missing[0]}{more}, which is missing; the download is "
                                  f"incomplete: download the missing shard(s) again")
            return [folder / s for s in shards]
    singles = [f"{b}.safetensors" for b in bases] + ["pytorch_model.bin"]
    for name in singles:
        if (folder / name).is_file():
            return [folder / name]
    raise ExportError(f"{folder} has no weight files (looked for {', '.join(indexes[:1] + singles)}); download them "
                      f"again or point SRC at the complete checkpoint folder")


def _open_files(source: Source) -> None:
    from safetensors import safe_open

    for f in source.files:
        try:
            if f.suffix == ".safetensors":
                handle: Any = safe_open(str(f), framework="pt", device="cpu")
                keys = handle.keys()
            else:
                handle = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                keys = handle.keys()
        except Exception as exc:  # noqa: BLE001 (any reader error means the same thing: a damaged file)
            raise ExportError(f"{f} cannot be read ({type(exc).__name__}: {exc}); the file is damaged or "
                              f"incomplete: download it again") from None
        source._handles.update(dict.fromkeys(keys, handle))


def _check_complete(source: Source) -> None:
    """Every tensor the config implies is present (for GPTQ layers: qweight, qzeros and scales)."""
    missing = []
    for key in source.shapes:
        module = key.removesuffix(".weight")
        quantized = source.gptq is not None and module.endswith(BLOCK_LINEARS) and key.endswith(".weight")
        needed = [f"{module}.{p}" for p in GPTQ_PARTS] if quantized else [key]
        missing += [k for k in needed if k not in source._handles]
    if missing:
        raise ExportError(
            f"{source.folder} lacks {len(missing)} tensor(s) its config.json implies (e.g. {missing[0]}): the "
            f"weights are incomplete or belong to another model; download the checkpoint again"
        )
