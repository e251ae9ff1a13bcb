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

from .sampling import device_tensor


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


class SlotKVCache:
    """The engine's preallocated cache: one row ("slot") per running sequence, each with its own length.

    Keys/values live in [slots, heads, capacity, head_dim] tensors per layer. Running sequences always occupy
    slots 0..n-1, so a decode step reads plain views (no gather of the cache). Capacity grows by doubling up
    to ``max_len``, so memory follows the longest sequence rather than the model's maximum. Before each
    forward the engine calls ``begin`` (decode) or ``begin_prefill`` to say which slots the batch covers and
    where each row writes; the model's attention then calls ``update`` as it does on any transformers cache.
    With ``quantized`` the cache stores the original's int8 form (``quantize_int8`` per forward chunk, per row
    over the row's own tokens). A layer with an attention window w keeps only its last w keys, in a ring of w
    entries, so its memory stops growing past the window.

    With ``static`` (the engine's compiled decode step) a decode attends over the longest row's
    length rounded up to a power of two (at least the initial capacity), masked, so the step sees a
    few shapes only; the tensors keep fixed addresses for CUDA graphs, and one spare position, so
    the attended length never equals the tensors' length (torch.compile would take that equality
    for a rule and compile again when it breaks).
    """

    def __init__(self, num_layers: int, slots: int, heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device, initial: int = 256, quantized: bool = False,
                 windows: list[int | None] | None = None, static: bool = False) -> None:
        self.max_len, self.dtype, self.quantized, self.static, self.device = max_len, dtype, quantized, static, device
        self.capacity = self.initial = min(initial, max_len)
        self.windows = [min(w, max_len) if w else None for w in windows or [None] * num_layers]
        names = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero") if quantized else ("k", "v")

        def empty(name: str, window: int | None) -> torch.Tensor:
            length = window or self.capacity + static
            if name.endswith(("scale", "zero")):
                return torch.zeros(slots, heads, length, 1, dtype=dtype, device=device)
            kind = torch.uint8 if quantized else dtype
            return torch.zeros(slots, heads, length, head_dim, dtype=kind, device=device)

        with torch.inference_mode():  # as the tensors grown during a step, so compiled code sees one kind
            self.layers = [{name: empty(name, w) for name in names} for w in self.windows]
        self._mark_static()
        self._rows: slice | torch.Tensor = slice(0, 0)  # the slots of the forward's rows: a view, or gathered
        self._slots: list[int] = []
        self._starts: torch.Tensor | None = None
        self._offsets: list[int] | None = None
        self._lengths: list[int] | None = None
        self._kv_len = 0
        self._q_len = 0

    def _tensors(self) -> list[torch.Tensor]:
        return [t for store in self.layers for t in store.values()]

    def _mark_static(self) -> None:
        """Tell torch.compile that the cache tensors stay put, so CUDA graphs may update them in place."""
        if self.static:
            for t in self._tensors():
                torch._dynamo.mark_static_address(t)

    def ensure_capacity(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the engine's max_model_len {self.max_len}")
        if length <= self.capacity:
            return
        new = self.capacity
        while new < length:
            new *= 2
        new = min(new, self.max_len)
        for store, window in zip(self.layers, self.windows, strict=True):
            if window:  # a ring keeps its size
                continue
            for name, t in store.items():
                grown = t.new_zeros(*t.shape[:2], new + self.static, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                store[name] = grown
        self.capacity = new
        self._mark_static()

    def begin(self, rows: slice, starts: torch.Tensor, q_len: int, kv_len: int) -> int:
        """Next forward decodes slots ``rows``: row i writes one token at its own position ``starts[i]``
        (prefills go through ``begin_prefill``). Returns how many keys the forward attends: ``kv_len``,
        rounded up for a static cache."""
        self.ensure_capacity(kv_len)
        if self.static:
            kv_len = min(max(1 << (kv_len - 1).bit_length(), self.initial), self.capacity)
        self._rows, self._starts, self._q_len, self._kv_len = rows, starts, q_len, kv_len
        self._slots, self._offsets, self._lengths = [], None, None
        return kv_len

    def begin_chunks(self, slots: list[int], offsets: list[int], chunks: list[list[int]], width: int = 1,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Next forward feeds ``chunks[i]`` (token ids) into slot ``slots[i]`` at positions ``offsets[i]`` on, after
        the keys already in the slot: a prompt's chunk, a sequence's next token and its guesses. Returns the
        forward's input ids and positions [rows, width], the chunks right-padded to the longest (at least
        ``width``), and its attention mask, in which each query sees the keys up to its own position (None where
        the causal mask does that: every chunk from position 0, none padded past the longest). A ring (window)
        layer takes chunks from position 0 only."""
        lengths = [len(chunk) for chunk in chunks]
        kv_len = max(o + n for o, n in zip(offsets, lengths, strict=True))
        if any(offsets) and any(self.windows):
            raise ValueError("a model with window attention prefills from position 0 only")
        self.ensure_capacity(kv_len)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        self._rows = slice(slots[0], slots[0] + len(slots)) if contiguous else torch.tensor(slots, device=self.device)
        self._slots, self._offsets, self._lengths = list(slots), list(offsets), lengths
        self._starts, self._q_len, self._kv_len = None, max(lengths), kv_len
        width = max(width, *lengths)
        ids = torch.tensor([chunk + [0] * (width - len(chunk)) for chunk in chunks], device=self.device)
        positions = device_tensor(offsets, self.device)[:, None] + torch.arange(width, device=self.device)[None]
        if not any(offsets) and width == kv_len:
            return ids, positions, None
        keys = torch.arange(kv_len, device=self.device)
        real = torch.arange(width, device=self.device)[None] < device_tensor(lengths, self.device)[:, None]
        # A padding query may see every key (its output is never used) rather than none (NaN).
        return ids, positions, ((keys[None, None] <= positions[:, :, None]) | ~real[:, :, None])[:, None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len - self._q_len

    def _encode(self, states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What is stored for new states: themselves, or their int8 form (quantized, scale, zero)."""
        if not self.quantized:
            return (states,)
        if self._starts is not None:  # decode: one token per row
            return quantize_int8(states)
        parts = [torch.zeros_like(states, dtype=torch.uint8), torch.ones_like(states[..., :1]),
                 torch.zeros_like(states[..., :1])]
        for row, length in enumerate(self._lengths):  # pad keys must not widen a row's range
            for part, value in zip(parts, quantize_int8(states[row : row + 1, :, :length]), strict=True):
                part[row : row + 1, :, :length] = value
        return tuple(parts)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        store, window = self.layers[layer_idx], self.windows[layer_idx]
        new = dict(zip(store, (*self._encode(key_states), *self._encode(value_states)), strict=True))
        decode_idx = None
        if self._starts is not None:
            decode_idx = torch.arange(self._rows.start, self._rows.stop, device=key_states.device)
        for name, t in store.items():
            if decode_idx is not None:
                t[decode_idx, :, self._starts % window if window else self._starts] = new[name][:, :, 0]
            elif not window:
                for row, (slot, offset, length) in enumerate(zip(self._slots, self._offsets, self._lengths,
                                                                 strict=True)):
                    t[slot, :, offset : offset + length] = new[name][row, :, :length]
            else:  # prefill into a ring: each row's last `window` real positions
                for row, (slot, length) in enumerate(zip(self._slots, self._lengths, strict=True)):
                    pos = torch.arange(max(0, length - window), length, device=t.device)
                    t[slot, :, pos % window] = new[name][row, :, pos]
        if window and decode_idx is None:
            view = new  # a prefill attends over its own chunk (no past)
        else:
            view = {name: t[self._rows, :, : window or self._kv_len] for name, t in store.items()}
        if not self.quantized:
            return view["k"], view["v"]
        return tuple(
            dequantize_int8(view[p], view[f"{p}_scale"], view[f"{p}_zero"]).to(self.dtype) for p in ("k", "v")
        )

    def layer_mask(self, layer_idx: int, mask: torch.Tensor | None) -> torch.Tensor | None:
        """A ring layer's decode mask: the ring entries each row has filled (all of them inside the
        window). Other layers keep the mask the model built."""
        window = self.windows[layer_idx]
        if not window or self._starts is None:
            return mask
        filled = torch.clamp(self._starts + 1, max=window)
        return (torch.arange(window, device=filled.device)[None] < filled[:, None])[:, None, None, :]

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` into ``dst`` (the engine keeps running sequences in slots 0..n-1)."""
        for t in self._tensors():
            t[dst] = t[src]

    def swap(self, a: int, b: int) -> None:
        for t in self._tensors():
            t[[a, b]] = t[[b, a]]

    def read(self, slot: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A copy of the keys and values of positions [start, end) of ``slot``, per layer (not for int8 or
        ring layers, whose stored form depends on more than the tokens)."""
        return [(store["k"][slot, :, start:end].clone(), store["v"][slot, :, start:end].clone())
                for store in self.layers]

    def write(self, slot: int, start: int, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put keys and values (as ``read`` returns them) at positions ``start`` on of ``slot``."""
        end = start + kv[0][0].shape[1]
        self.ensure_capacity(end)
        for store, (k, v) in zip(self.layers, kv, strict=True):
            store["k"][slot, :, start:end] = k
            store["v"][slot, :, start:end] = v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())
