"""The int8 KV cache of Qwen v1 (``use_cache_quantization``), as a transformers Cache.

Rule of the original: each forward call's new keys (and values) of shape [B, heads, T, D] get one
scale and zero point per (batch row, head), taken over that chunk's T x D values:
``scale = (max - min) / 255``, ``zero = -min / scale``, ``q = clamp(x / scale + zero, 0, 255)``
truncated to uint8, and ``x ~= scale * (q - zero)``. The current chunk is attended in its
quantized form too, as in the original. Storage per cached token and head is D bytes plus two
scalars, about 4x less than fp32 and 2x less than bf16.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize [B, H, T, D] to uint8 with per-(B, H) scale/zero, returned per token as [B, H, T, 1]."""
    flat = x.flatten(2)
    xmax = flat.amax(dim=-1, keepdim=True).unsqueeze(-1)
    xmin = flat.amin(dim=-1, keepdim=True).unsqueeze(-1)
    scale = (xmax - xmin) / 255
    # A constant chunk has no range; any non-zero scale then represents it exactly.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = -xmin / scale
    q = torch.clamp(x / scale + zero, 0, 255).to(torch.uint8)  # .to() truncates, as the original does
    t = x.shape[2]
    return q, scale.expand(-1, -1, t, -1).contiguous(), zero.expand(-1, -1, t, -1).contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


class Int8KVLayer(DynamicLayer):
    """One layer's int8 cache: uint8 keys/values plus per-token scale and zero point."""

    is_croppable = False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = self.values = None
        self.key_scale = self.key_zero = self.value_scale = self.value_zero = None
        self.is_initialized = True

    def _parts(self) -> list[str]:
        return ["keys", "key_scale", "key_zero", "values", "value_scale", "value_zero"]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = (*quantize_int8(key_states), *quantize_int8(value_states))
        for name, chunk in zip(self._parts(), new, strict=True):
            old = getattr(self, name)
            setattr(self, name, chunk if old is None else torch.cat([old, chunk], dim=-2))
        keys = dequantize_int8(self.keys, self.key_scale, self.key_zero).to(self.dtype)
        values = dequantize_int8(self.values, self.value_scale, self.value_zero).to(self.dtype)
        return keys, values

    def get_seq_length(self) -> int:
        return 0 if not self.is_initialized or self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes held by this layer's cache (quantized tensors and their scales)."""
        if self.get_seq_length() == 0:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._parts())

    def _apply(self, fn) -> None:
        if self.get_seq_length() > 0:
            for name in self._parts():
                setattr(self, name, fn(getattr(self, name)))

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])


class Int8KVCache(Cache):
    """A cache whose every layer stores keys and values as int8 (Qwen's ``use_cache_quantization``)."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[Int8KVLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
