"""LoRA adapters served beside the base model, never merged into it.

An adapter is a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``, as
``finetune/`` writes it): low-rank matrices A [r, in] and B [out, r] per target layer (``c_attn``,
``c_proj``, ``w1``, ``w2``, ``lm_head``, and ``wte`` as an embedding), and for a base-model fine-tune whole
copies of ``wte``/``lm_head`` (PEFT's ``modules_to_save``). A layer with an adapter computes
``base(x) + (x A^T) (s B)^T`` (s: ``lora_alpha / r``): the base layer is whatever the model holds (bf16,
fp32, ``--int8``, ``--int4``, a GPTQ folder's int4), so a Q-LoRA adapter runs on the 4-bit base it was
trained on, and many adapters share one copy of the base.

Which rows of a batch use which adapter is set per forward pass with :func:`use_lora` (per thread: the
engine's thread and a scoring thread do not see each other's). Rows are grouped by adapter and each group
runs its two small matmuls on its rows only: a decode step of 8 rows on 4 adapters reads each adapter's
matrices once (gathering a copy of the matrices per row, the other common way, reads them once per row;
``bench/lora.py`` measures both). Rows without an adapter pay nothing but the grouping.

Python use::

    adapter = load_lora(model, "output_qwen")
    with use_lora(adapter):
        response, history = model.chat(tokenizer, "Hi", history=None)
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
LINEAR_TARGETS = ("c_attn", "c_proj", "w1", "w2", "lm_head")
EMBEDDING_TARGETS = ("wte",)
PEFT_PREFIX = "base_model.model."
# Adapter settings this module does not implement, with the value that means "not used".
UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "layer_replication": None,
               "target_parameters": None, "use_qalora": False, "trainable_token_indices": None}


class AdapterError(ValueError):
    """A LoRA folder that cannot serve on this model; the message says why and what to do."""


@dataclass
class Delta:
    """One low-rank update of a layer's output: ``down`` is A [r, in] for a Linear (A^T [vocab, r] for an
    embedding, so both look up or multiply the same way), ``up`` is s*B [out, r]; it adds to the output
    channels ``out`` (all, or w1's or w2's half of a fused w12)."""

    down: torch.Tensor
    up: torch.Tensor
    out: slice


@dataclass(eq=False)
class LoraAdapter:
    """An adapter loaded onto one model: its deltas and replaced weights keyed by the model's layer names."""

    name: str
    path: Path
    base_model: str | None  # adapter_config.json's base_model_name_or_path
    deltas: dict[str, list[Delta]] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save: layer -> whole weight
    key: bytes = field(default_factory=lambda: uuid.uuid4().bytes)  # tells its keys apart in the prefix cache

    @property
    def nbytes(self) -> int:
        tensors = [t for ds in self.deltas.values() for d in ds for t in (d.down, d.up)] + list(self.replaced.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def rank(self) -> int:
        """The largest rank of its matrices (0 for an adapter of whole layers only)."""
        return max((d.up.shape[1] for ds in self.deltas.values() for d in ds), default=0)

    @property
    def targets(self) -> list[str]:
        """The layer kinds it changes (``c_attn``, ``wte``, ...)."""
        return sorted({n.rsplit(".", 1)[-1] for n in (*self.deltas, *self.replaced)})


# ----- which rows use which adapter ---------------------------------------------------------------

Groups = list[tuple[LoraAdapter, torch.Tensor | None]]  # (adapter, its rows; None: every row)
_routing = threading.local()


def row_groups(adapters: Sequence[LoraAdapter | None], device: torch.device) -> Groups:
    """Rows grouped by adapter for a batch whose row i uses ``adapters[i]`` (None: the base model)."""
    rows: dict[LoraAdapter, list[int]] = {}
    for i, adapter in enumerate(adapters):
        if adapter is not None:
            rows.setdefault(adapter, []).append(i)
    if len(rows) == 1 and len(next(iter(rows.values()))) == len(adapters):
        return [(next(iter(rows)), None)]
    return [(a, torch.tensor(r, device=device)) for a, r in rows.items()]


@contextmanager
def use_lora(adapters: LoraAdapter | Groups | None) -> Iterator[None]:
    """Run the forward passes inside with an adapter on every row (or with ``row_groups``), in this thread."""
    groups = [(adapters, None)] if isinstance(adapters, LoraAdapter) else list(adapters or [])
    previous = getattr(_routing, "groups", [])
    _routing.groups = groups
    try:
        yield
    finally:
        _routing.groups = previous


def active_groups() -> Groups:
    return getattr(_routing, "groups", [])


# ----- the layer ----------------------------------------------------------------------------------


class LoraLayer(nn.Module):
    """A model layer (``base``: any Linear-like module or the embedding) plus the adapters of the rows that
    use one. Without adapters in the batch it is the base layer; compiled graphs (the engine's decode step,
    which runs eagerly whenever a row has an adapter) see only the base layer."""

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.base, self.name = base, name
        self.embedding = isinstance(base, nn.Embedding)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, weight) if self.embedding else F.linear(x, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = [] if torch.compiler.is_compiling() else active_groups()
        used = [(a, rows) for a, rows in groups if self.name in a.deltas or self.name in a.replaced]
        if not used:
            return self.base(x)
        whole = next((a.replaced[self.name] for a, rows in used if rows is None and self.name in a.replaced), None)
        y = self.base(x) if whole is None else self._apply_weight(x, whole)
        for adapter, rows in used:
            part = x if rows is None else x.index_select(0, rows)
            if rows is not None and self.name in adapter.replaced:
                y.index_copy_(0, rows, self._apply_weight(part, adapter.replaced[self.name]))
            deltas = adapter.deltas.get(self.name, ())
            if deltas and not self.embedding:
                part = part.to(deltas[0].down.dtype)  # (an adapter's matrices share one dtype, see delta_dtype)
            for delta in deltas:
                update = F.linear(self._apply_weight(part, delta.down), delta.up)
                target = y[..., delta.out]
                if rows is None:
                    target.add_(update)
                else:
                    target.index_add_(0, rows, update.to(y.dtype))
        return y


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's layers an adapter may target, by name (a wrapped one by the name of the layer it wraps)."""
    kinds = LINEAR_TARGETS + EMBEDDING_TARGETS + ("w12",)
    return {name: module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in kinds}


_wrapping = threading.Lock()  # two loads at once wrap each layer once


def enable_lora(model: nn.Module) -> None:
    """Wrap every layer an adapter may target in a ``LoraLayer`` (once; in place). Loading an adapter does it;
    a server does it before compiling, so later loads leave the compiled graphs' modules as they are."""
    with _wrapping:
        for name, module in _layers(model).items():
            if not isinstance(module, LoraLayer):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, LoraLayer(module, name))


# ----- loading ------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict:
    config_file = folder / "adapter_config.json"
    if not folder.is_dir():
        raise AdapterError(f"LoRA adapter folder {str(folder)!r} does not exist")
    if not config_file.is_file():
        raise AdapterError(f"{folder} has no adapter_config.json: it is not a LoRA adapter folder (finetune.py "
                           "--use_lora writes one into its --output_dir)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{folder} holds a {kind} adapter; only LoRA adapters (peft_type LORA) can be served")
    for key, off in UNSUPPORTED.items():
        if config.get(key, off) not in (off, [], {}):
            raise AdapterError(f"{folder}: the adapter uses {key}={config[key]!r}, which qwen does not implement; "
                               "merge it with finetune/merge_lora.py and serve the merged folder instead")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{folder}: the adapter trains biases (bias={config['bias']!r}), which qwen does not serve "
                           "unmerged; merge it with finetune/merge_lora.py instead")
    return config


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(folder / "adapter_model.safetensors")
        except (SafetensorError, OSError) as exc:
            raise AdapterError(f"{folder}/adapter_model.safetensors cannot be read ({exc}): the file is damaged or "
                               "incomplete; copy it again") from None
    if (folder / "adapter_model.bin").is_file():
        try:
            return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same to the user
            raise AdapterError(f"{folder}/adapter_model.bin cannot be read ({exc})") from None
    raise AdapterError(f"{folder} has adapter_config.json but no adapter_model.safetensors: the adapter's weights "
                       "are missing (copy the whole output folder of finetune.py)")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a layer name that ends with it."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def delta_dtype(device: torch.device, activations: torch.dtype) -> torch.dtype:
    """The dtype of an adapter's A and B: fp32 on a CPU, where matmuls this small run 2-3x faster in fp32 than in bf16
    (measured on a Xeon, rank 8 at batch 1: 47 against 139 µs for a 2048 -> 6144 layer) and the update is not
    rounded on the way; elsewhere the activations' dtype."""
    return torch.float32 if device.type == "cpu" else activations


def _channels(layer: nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of a Linear-like layer; (vocabulary, hidden size) of an embedding."""
    if isinstance(layer, nn.Embedding):
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


def load_lora(model: nn.Module, path: str | Path, name: str | None = None) -> LoraAdapter:
    """Read a PEFT LoRA folder and prepare it to run on ``model`` (unmerged; see the module docstring). Every
    tensor is checked against the model's layers: an adapter of another base model, a damaged folder or an
    unsupported setting is an ``AdapterError`` that says which, and the model computes what it did before."""
    folder = Path(path).expanduser()
    config = _read_config(folder)
    tensors = _read_tensors(folder)
    base_model = config.get("base_model_name_or_path")
    trained_on = f" (it was trained on {base_model})" if base_model else ""
    enable_lora(model)
    layers = {name: module.base for name, module in _layers(model).items()}
    fused = {name.removesuffix("w12"): module for name, module in layers.items() if name.endswith("w12")}
    embeddings = model.get_input_embeddings().weight
    device, dtype = embeddings.device, embeddings.dtype
    small = delta_dtype(device, dtype)

    def layer_of(module: str) -> tuple[str, nn.Module, slice]:
        """Where a layer of the original model lives here: its own module, or half of a fused w12."""
        if module in layers:
            return module, layers[module], slice(None)
        owner, _, leaf = module.rpartition(".")
        if leaf in ("w1", "w2") and (w12 := fused.get(owner + ".")) is not None:
            half = w12.out_features // 2
            return owner + ".w12", w12, slice(0, half) if leaf == "w1" else slice(half, 2 * half)
        layer = re.search(r"\.h\.(\d+)\.", module)
        count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        hint = (f"; this model has {count} layers" if layer and count is not None and int(layer[1]) >= count else
                "; the adapter belongs to another model architecture")
        raise AdapterError(f"{folder}: the adapter has weights for {module}, which this model lacks{hint}{trained_on}")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        plain = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)", plain)
        if match:
            pairs.setdefault(match[1], {})[match[2].split(".")[0].replace("embedding_", "")] = tensor
        elif (whole := re.fullmatch(r"(.+\.)?(wte|lm_head)(\.base_layer)?\.weight", plain)) is not None:
            # modules_to_save, or the base layer itself (peft saves an embedding's when an adapter targets one)
            replaced[(whole[1] or "") + whole[2]] = tensor
        else:
            raise AdapterError(f"{folder}: unexpected tensor {key} in the adapter's weights (not a LoRA matrix of a "
                               "Qwen layer)")
    if not pairs and not replaced:
        raise AdapterError(f"{folder}: the adapter's weights file holds no LoRA matrices")

    adapter = LoraAdapter(name or folder.resolve().name, folder, base_model)
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{folder}: {module} has only {', '.join(pair)}; the weights file is incomplete")
        owner, layer, out = layer_of(module)
        embedding = isinstance(layer, nn.Embedding)
        a, b = pair["lora_A"], pair["lora_B"]
        rank = a.shape[0]
        want_in, want_out = _channels(layer)
        want_out = want_out if out.stop is None else out.stop - out.start
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != rank:
            raise AdapterError(f"{folder}: {module}'s lora_A {list(a.shape)} and lora_B {list(b.shape)} do not make "
                               "a rank-r pair; the weights file is damaged")
        if (a.shape[1], b.shape[0]) != (want_in, want_out):
            raise AdapterError(f"{folder}: {module} maps {a.shape[1]} -> {b.shape[0]} channels in the adapter but "
                               f"{want_in} -> {want_out} in this model: the adapter belongs to another base model"
                               f"{trained_on}")
        configured = _pattern_value(config.get("rank_pattern"), module, config.get("r", rank))
        if configured != rank:
            raise AdapterError(f"{folder}: adapter_config.json gives {module} rank {configured}, its weights have rank "
                               f"{rank}: the config and the weights file are from different adapters")
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
        scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        down = a.t() if embedding else a
        adapter.deltas.setdefault(owner, []).append(Delta(
            down.to(device, small).contiguous(), (b.float() * scale).to(device, small), out))
    for module, weight in replaced.items():
        _, layer, _ = layer_of(module)
        channels = _channels(layer)
        shape = channels if isinstance(layer, nn.Embedding) else channels[::-1]  # the weight's own layout
        if tuple(weight.shape) != shape:
            raise AdapterError(f"{folder}: the adapter's own {module} is {list(weight.shape)}, this model's "
                               f"{list(shape)}: the adapter belongs to another base model{trained_on}")
        weight, own = weight.to(device, dtype), layer.weight
        if not (own.dtype == dtype and own.shape == weight.shape and torch.equal(weight, own)):
            adapter.replaced[module] = weight  # (an unchanged base layer costs no memory)
    return adapter


class AdapterRegistry:
    """The adapters resident on one model under their names (a server's ``--lora`` and run-time loads), at most
    ``max_loras`` of them. Loading and unloading are safe while the engine runs: a request holds its adapter, so
    one that is running when its adapter is unloaded finishes with it; the memory goes when the last one ends."""

    def __init__(self, model: nn.Module, base_name: str, max_loras: int) -> None:
        self.model, self.base_name, self.max_loras = model, base_name, max_loras
        self.adapters: dict[str, LoraAdapter] = {}
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path) -> LoraAdapter:
        """Load ``path`` as ``name``; ``AdapterError`` says why it cannot be."""
        if not name or name == self.base_name:
            raise AdapterError(f"an adapter cannot be named {name!r}: "
                               + ("that is the base model's name" if name else "give it a name"))
        with self._lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first or pick another name")
            if len(self.adapters) >= self.max_loras:
                raise AdapterError(f"{len(self.adapters)} adapters are loaded, the most --max-loras allows; unload one "
                                   "or start the server with a larger --max-loras")
            self.adapters[name] = None  # taken while its weights load (outside the lock would race a second load)
        try:
            adapter = load_lora(self.model, path, name)
        except BaseException:
            with self._lock:
                del self.adapters[name]
            raise
        with self._lock:
            self.adapters[name] = adapter
        logger.info("LoRA adapter %r loaded from %s (rank %d, %s, %.1f MiB)", name, adapter.path, adapter.rank,
                    "+".join(adapter.targets), adapter.nbytes / 2**20)
        return adapter

    def unload(self, name: str) -> None:
        with self._lock:
            if self.adapters.get(name) is None:
                raise KeyError(name)
            del self.adapters[name]

    def get(self, name: str) -> LoraAdapter | None:
        return self.adapters.get(name)

    def loaded(self) -> list[LoraAdapter]:
        return [a for a in list(self.adapters.values()) if a is not None]
