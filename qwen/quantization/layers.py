"""Weight-only int8 and int4 quantization of Linear layers (``--int8`` / ``--int4``).

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth: int8 weights move
half the bytes of bf16, 4-bit ones a quarter. In a decode step (one token per sequence, see ``one_token_each``) a
layer multiplies its quantized weight directly; a prompt's tokens take qwen's integer matrix products where
``integer_prompts`` (CPUs with AVX-512 VNNI whose bf16 matmul has no AMX), else the weight dequantized a few MiB at
a time and one matmul.

* ``BlockLinear``: blocks of 32 input channels with one bf16 scale each, 8 bits (llama.cpp's Q8_0) or 4 bits
  (Q4_0), on qwen's AVX-512 block kernel (``qwen/csrc/block_matvec.cpp``, compiled once per machine on first use),
  which quantizes the activations to int8 in the same blocks and, on CPUs with AVX-512 VNNI, multiplies with
  integer dot products (``QWEN_INT8_VNNI=0`` keeps them exact in fp32): the precision of llama.cpp's dot products.
* ``Int8Linear``: a ``BlockLinear`` of 8 bits where that kernel runs; elsewhere one scale per output channel, for
  PyTorch's ``_weight_int8pack_mm`` on the CPU or qwen's Triton kernel on CUDA (``triton_int8.py``, up to 16 rows).
* ``Int4Linear``: asymmetric groups (a scale and a zero point per group of input channels, GPTQ's layout): GPTQ
  int4 folders, and ``--int4`` where the block kernel cannot run. On the CPU, for groups of 128 or 256, qwen's
  ``qwen/csrc/int4_matvec.cpp`` (int8 activations, AVX-512 VNNI or AVX2); other groups PyTorch's
  ``_weight_int4pack_mm_for_cpu``; on CUDA the tinygemm kernel (``_weight_int4pack_mm``, bf16 activations).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu_kernels import ONEDNN_AMX, one_token_each, qwen_int4_kernel, qwen_int8_kernel
from . import triton_int8

logger = logging.getLogger(__name__)

# A prompt's matmul dequantizes a weight this many bytes at a time (see dequantized_linear).
DEQUANTIZED_BLOCK_BYTES = 8 << 20

Kernel = Literal["auto", "qwen", "torch"]


def dequantized_linear(flat: torch.Tensor, out_features: int, rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``flat @ W.T`` for a quantized layer's float weight ``W``, of which ``rows(start, end)`` makes output rows
    ``start:end`` in ``flat``'s dtype, about ``DEQUANTIZED_BLOCK_BYTES`` at a time: a prompt never holds a whole
    float copy of a weight (an lm_head's is 1.2 GB in fp32), and each block is still in cache for its matmul."""
    step = max(16, DEQUANTIZED_BLOCK_BYTES // (flat.shape[1] * flat.element_size()))
    if step >= out_features:
        return F.linear(flat, rows(0, out_features))
    return torch.cat([F.linear(flat, rows(start, min(start + step, out_features)))
                      for start in range(0, out_features, step)], dim=1)


BLOCK = 32  # input channels per scale in qwen's block format (llama.cpp's Q8_0 and Q4_0 blocks)

# AVX-512 VNNI, unless ATEN_CPU_CAPABILITY has PyTorch and qwen's kernels dispatch as on a CPU without AVX-512.
VNNI = torch.cpu._is_vnni_supported() and torch.backends.cpu.get_cpu_capability() == "AVX512"


def integer_prompts(dtype: torch.dtype) -> bool:
    """Whether a prompt's tokens (activations of ``dtype``) take qwen's integer matrix products rather than the
    dequantized weight in PyTorch's matmul: the block kernel's (activations quantized to int8 per block of 32, as a
    decode step's, so each token's output is the same to the bit as decoding it) and the int4 kernel's for groups of
    128 (int8 activations per 128 channels, as its decode kernel; the float sums round apart from it, so an
    ``Int4Linear`` still chooses by the tokens each sequence brings). The product wins wherever that
    matmul has no AMX (bench/int8_kernel.py, 2-core Intel Xeon, 2026-12-07, Qwen-1.8B's layer shapes at 512 rows:
    2.5-3.7x oneDNN's bf16 matmul held to AVX-512 BF16; about 2x its fp32 one, AMX or not); oneDNN's bf16 matmul on
    AMX is 1.8-3.6x the product (bench/int4_kernel.py, the int4 kernel's: 2.9-4.0x the dequantized path without
    AMX, 0.4-1.1x with it). ``QWEN_INT8_VNNI=0`` (the block kernel's float path) keeps every prompt dequantized."""
    amx = dtype == torch.bfloat16 and ONEDNN_AMX
    return VNNI and not amx and os.environ.get("QWEN_INT8_VNNI") != "0"


def quantize_blocks(w: torch.Tensor, block_size: int = BLOCK, bits: int = 8, block_rows: int = 1024,
                    packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest with one bf16 scale per block of ``block_size`` input channels (the last block
    of a row may be shorter; ``block_size >= in`` gives one scale per row), rounded against the rounded scale so
    that a scale's own rounding never shows as error. Returns q [out, in] and scale (bf16 [out, blocks]):

    * 8 bits, as Q8_0: scale = max|w| / 127, w ~ q * scale with q int8 in -127..127;
    * 4 bits, as Q4_0: scale = m / -8 for the block's weight m of largest magnitude (so m is exactly -8 steps,
      and the other side reaches 7), w ~ (q - 8) * scale with q uint8 in 0..15.

    With blocks of 32, 34 bytes per 32 weights (8 bits) or 18 (4 bits). ``packed`` returns q in the layout of
    ``pack_blocks``. Works through ``block_rows`` rows at a time, so its fp32 temporaries stay a few MiB
    instead of several copies of the whole matrix (a 7B model's lm_head alone is 2.5 GB in fp32)."""
    if bits not in (8, 4) or (packed and block_size != BLOCK):
        raise ValueError(f"blocks of {block_size} at {bits} bits: qwen's block format is 8 or 4 bits (packed: "
                         f"blocks of {BLOCK})")
    out_f, in_f = w.shape
    block_size = min(block_size, in_f)
    blocks = -(-in_f // block_size)
    width = (blocks * BLOCK * bits // 8) if packed else in_f
    q = torch.empty(out_f, width, dtype=torch.int8 if bits == 8 else torch.uint8, device=w.device)
    scale = torch.empty(out_f, blocks, dtype=torch.bfloat16, device=w.device)
    for start in range(0, out_f, block_rows):
        rows = slice(start, start + block_rows)
        block = F.pad(w[rows].float(), (0, blocks * block_size - in_f)).view(-1, blocks, block_size)
        if bits == 8:
            scale[rows] = (block.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            values = (block / scale[rows, :, None].float()).round_().clamp_(-127, 127)
        else:
            largest = block.gather(-1, block.abs().argmax(-1, keepdim=True))[..., 0]
            scale[rows] = largest / -8
            inverse = torch.where(scale[rows] != 0, 1 / scale[rows].float(), 0)
            values = (block * inverse[..., None]).round_().add_(8).clamp_(0, 15)
        values = values.flatten(1)[:, :in_f].to(q.dtype)
        q[rows] = pack_blocks(values, bits) if packed else values
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                      block_size: int = BLOCK) -> torch.Tensor:
    """The weight ``quantize_blocks(w, block_size, bits)`` represents (q in channel order: int8 for 8 bits, uint8
    for 4), in ``dtype`` (computed in fp32, rounded once); one scale per row (``scale`` [out, 1]) whatever
    ``block_size``."""
    out_f, in_f = q.shape
    blocks = scale.shape[1]
    block_size = in_f if blocks == 1 else block_size
    values = q.float() - (8 if q.dtype == torch.uint8 else 0)
    padded = F.pad(values, (0, blocks * block_size - in_f)).view(out_f, blocks, block_size)
    return (padded * scale.float()[..., None]).flatten(1)[:, :in_f].to(dtype)


def pack_blocks(q: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``q`` [out, in] (channel order) in the layout qwen's block kernel reads (``qwen/csrc/block_matvec.cpp``):
    rows padded with zeros to whole blocks of 32; in each group of 16 blocks (the last may hold fewer, G),
    channel ``32 l + 4 j + t`` in "vector" j, byte ``4 l + t``, so one 32-bit lane of a 64-byte vector belongs
    to one block. 8 bits: vector j at byte ``4 G j`` of the group. 4 bits: vectors j and j + 4 share the bytes at
    ``4 G j`` (j < 4), j in the low nibbles. Any dtype with 8 bits (activations too: a prompt's are put in this
    order to meet the weight as it is stored)."""
    out_f, in_f = q.shape
    blocks = -(-in_f // BLOCK)
    padded = F.pad(q, (0, blocks * BLOCK - in_f), value=8 if bits == 4 else 0)  # weights of 0 past the row
    parts = []
    for start, end in _groups(blocks):
        group = padded[:, start * BLOCK:end * BLOCK].reshape(out_f, end - start, 8, 4).transpose(1, 2)
        parts.append((group if bits == 8 else group[:, :4] | group[:, 4:] << 4).reshape(out_f, -1))
    return torch.cat(parts, dim=1)


def unpack_blocks(packed: torch.Tensor, in_features: int, bits: int = 8) -> torch.Tensor:
    """The inverse of ``pack_blocks``: [out, in] in channel order."""
    out_f = packed.shape[0]
    parts, offset = [], 0
    for start, end in _groups(packed.shape[1] * 8 // bits // BLOCK):
        size = (end - start) * BLOCK * bits // 8
        group = packed[:, offset:offset + size]
        offset += size
        if bits == 4:
            group = group.reshape(out_f, 4, -1)
            group = torch.cat([group & 15, group >> 4], dim=1)
        parts.append(group.reshape(out_f, 8, end - start, 4).transpose(1, 2).reshape(out_f, -1))
    return torch.cat(parts, dim=1)[:, :in_features]


def _groups(blocks: int, size: int = 16) -> list[tuple[int, int]]:
    """The kernel's groups of blocks: [start, end) of each."""
    return [(start, min(start + size, blocks)) for start in range(0, blocks, size)]


class BlockLinear(nn.Module):
    """A Linear layer whose weight is stored in blocks of 32 input channels with one bf16 scale each (see
    ``quantize_blocks``): 8 bits (Q8_0's precision) or 4 bits (Q4_0's), run by qwen's CPU block kernel
    (``torch.ops.qwen.block_matmul``, AVX-512; ``qwen_int8_kernel()`` must have built it). Decode steps
    (``one_token_each``) multiply the packed weight, and so do a prompt's tokens where ``integer_prompts`` (its
    integer matrix product: each token's output the same to the bit as decoding it); elsewhere a prompt's tokens
    put their activations in the packed channel order and multiply the weight dequantized as it is stored, a few
    MiB at a time.

    ``packed=False`` (8 bits only) keeps one scale per output channel in channel order instead, for the kernels
    other than qwen's (``Int8Linear``'s fallbacks, which also run the layer)."""

    def __init__(self, linear: nn.Linear, bits: int = 8, packed: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.use_qwen_kernel = packed
        block_size = BLOCK if packed else self.in_features
        weight, scales = quantize_blocks(linear.weight.detach(), block_size, bits, packed=packed)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if one_token_each(x) or integer_prompts(x.dtype):
            out = torch.ops.qwen.block_matmul(flat, self.weight, self.scales)
        else:
            compute = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
            out = dequantized_linear(pack_blocks(flat.to(compute)), self.out_features, lambda start, end: (
                torch.ops.qwen.block_dequantize(self.weight[start:end], self.scales[start:end], compute))).to(x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def dequantize(self, start: int = 0, end: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Output rows ``start:end`` of the float weight [rows, in] in channel order, in ``dtype``."""
        q = self.weight[start:end]
        q = unpack_blocks(q, self.in_features, self.bits) if self.use_qwen_kernel else q
        return dequantize_blocks(q, self.scales[start:end], dtype)


class Int8Linear(BlockLinear):
    """A Linear layer whose weight is stored as int8 with bf16 scales (see ``quantize_blocks``).

    ``kernel`` picks the CPU int8 kernel for decode steps: "qwen" (needs AVX-512 and a compiler), "torch"
    (PyTorch's), or "auto" (qwen's where it can be built). qwen's kernel takes a scale per 32 input channels
    (a packed ``BlockLinear``, Q8_0's precision); PyTorch's CPU kernel and the CUDA kernel one per output
    channel, so a layer is quantized for the kernel that runs it."""

    def __init__(self, linear: nn.Linear, kernel: Kernel = "auto") -> None:
        # The CPU kernel is built only for layers made on the CPU (a CUDA layer never runs it).
        on_cpu = linear.weight.device.type == "cpu"
        use_qwen_kernel = kernel != "torch" and on_cpu and qwen_int8_kernel() is not None
        if kernel == "qwen" and on_cpu and not use_qwen_kernel:
            raise RuntimeError(
                "kernel='qwen' needs an AVX-512 CPU and a C++ toolchain to build qwen's int8 kernel "
                "(see the warning above); use kernel='auto' to fall back to PyTorch's"
            )
        super().__init__(linear, bits=8, packed=use_qwen_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_qwen_kernel:
            return super().forward(x)
        flat = x.reshape(-1, self.in_features)
        scales = self.scales[:, 0].to(x.dtype)
        if x.is_cuda and flat.shape[0] <= triton_int8.BLOCK_M and triton_int8.available():
            out = torch.ops.qwen.int8_matmul_cuda(flat, self.weight, scales)
        elif x.device.type != "cpu" or not one_token_each(x):
            out = dequantized_linear(flat, self.out_features, lambda start, end: self.dequantize(start, end, x.dtype))
        else:
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


def quantize_groups(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest per group of ``group_size`` input channels, as GPTQ stores it:
    ``w[o, i] ~ scale[o, g] * (q[o, i] - zero[o, g])`` with ``g = i // group_size``, q and zero in
    0..2^bits-1. Returns q (uint8 [out, in]), scale and zero (fp32 [out, groups])."""
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"{in_f} input channels do not split into groups of {group_size}")
    top = 2**bits - 1
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # zero stays representable
    scale = ((hi - lo) / top).clamp(min=torch.finfo(torch.float32).tiny)
    zero = (-lo / scale).round().clamp(0, top)
    q = (g / scale[..., None] + zero[..., None]).round().clamp(0, top).to(torch.uint8)
    return q.reshape(out_f, in_f), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fp32 weight [out, in] that ``quantize_groups`` (or a GPTQ layer) represents."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = (q.float().reshape(out_f, groups, -1) - zero[..., None]) * scale[..., None]
    return w.reshape(out_f, in_f)


def _inner_k_tiles(in_features: int) -> int:
    """The int4 kernels' K tiling: the largest of 8, 4, 2 that divides in_features / 16."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


class Int4Linear(nn.Module):
    """A Linear layer with group-wise 4-bit weights (``group_size`` input channels per scale and zero).

    Built from a float ``nn.Linear`` (round-to-nearest) or from a GPTQ layer's unpacked values, on
    the device it will run on: the packed layout differs between the kernels, so a layer refuses to
    run on another device. ``kernel`` picks the CPU kernel: "qwen" (groups of a multiple of 128, an
    AVX2 CPU and a compiler), "torch" (PyTorch's), or "auto" (qwen's where it applies). Buffers:
    ``packed`` (the 4-bit values, half a byte each) and ``scale_and_offset`` in the kernel's form:
    qwen's keeps (scale, scale * zero) per group in float32 [out, groups, 2]; PyTorch's
    (scale, offset) [groups, out, 2] in the compute dtype (on CUDA the tinygemm kernel, which takes bf16
    activations: others are converted for it)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, kernel: Kernel = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = self.in_features // scale.shape[1]
        self.packed_for = q.device.type
        self.compute_dtype = torch.bfloat16 if q.is_cuda else dtype
        group, width = self.group_size, self.in_features
        fits_qwen = self.packed_for == "cpu" and group in (128, 256) and width % group == 0
        self.use_qwen_kernel = kernel != "torch" and fits_qwen and qwen_int4_kernel() is not None
        if not self.use_qwen_kernel and (
            self.group_size not in (32, 64, 128, 256) or self.in_features % 32 or self.out_features % 16
        ):
            raise ValueError(
                f"int4 layers need 32, 64, 128 or 256 input channels per group, in_features divisible by 32 and "
                f"out_features by 16; got {self.in_features} -> {self.out_features} with groups of {self.group_size}"
            )
        if kernel == "qwen" and not self.use_qwen_kernel:
            raise RuntimeError(
                "kernel='qwen' needs a CPU layer with groups of 128 or 256 channels, an AVX2 CPU and a C++ toolchain "
                "(see any warning above); use kernel='auto' to fall back to PyTorch's int4 kernel"
            )
        if self.use_qwen_kernel:
            # Blocks of 128 channels, 64 bytes each: channel j in the low nibble of byte j, 64 + j in the high one.
            blocks = q.reshape(self.out_features, -1, 2, 64)
            packed = (blocks[:, :, 0] | blocks[:, :, 1] << 4).reshape(self.out_features, -1)
            scale_and_offset = torch.stack([scale, scale * zero], dim=-1).float()  # [out, groups, 2]
        else:
            # The kernels' form of the same weight: w = (q - 8) * scale + offset, offset = scale * (8 - zero).
            scale_and_offset = torch.stack([scale.t(), (scale * (8 - zero)).t()], dim=-1).to(self.compute_dtype)
            tiles = _inner_k_tiles(self.in_features)
            if q.is_cuda:
                packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
            else:
                packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), tiles)
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scale_and_offset", scale_and_offset.contiguous())
        self.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False) if bias is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, kernel: Kernel = "auto") -> Int4Linear:
        q, scale, zero = quantize_groups(linear.weight, 4, group_size)
        return cls(q, scale, zero, linear.bias, linear.weight.dtype, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != self.packed_for:
            raise RuntimeError(
                f"this int4 layer was packed for {self.packed_for} and cannot run on {x.device.type}: "
                f"move the model to {x.device.type} first, then quantize it"
            )
        flat = x.reshape(-1, self.in_features)
        if not self.use_qwen_kernel:
            kernel = torch._weight_int4pack_mm if x.is_cuda else torch._weight_int4pack_mm_for_cpu
            out = kernel(flat.to(self.compute_dtype).contiguous(), self.packed, self.group_size,
                         self.scale_and_offset).to(x.dtype)
        elif one_token_each(x):
            out = torch.ops.qwen.int4_matmul(flat, self.packed, self.scale_and_offset, self.group_size)
        elif integer_prompts(x.dtype):
            out = torch.ops.qwen.int4_product(flat, self.packed, self.scale_and_offset, self.group_size)
        else:
            out = dequantized_linear(flat, self.out_features, lambda start, end: self._dequantize(start, end, x.dtype))
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out

    def _dequantize(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Output rows ``start:end`` of the float weight, in ``dtype``."""
        packed, scale_and_offset = self.packed[start:end], self.scale_and_offset[start:end]
        if dtype in (torch.float32, torch.bfloat16) and not torch.compiler.is_compiling():
            weight = _scratch((end - start) * self.in_features, dtype).view(end - start, self.in_features)
            torch.ops.qwen.int4_dequantize_into(packed, scale_and_offset, self.group_size, weight)
            return weight
        return torch.ops.qwen.int4_dequantize(packed, scale_and_offset, self.group_size, dtype)


_scratch_buffers = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer of at least ``numel`` elements (one block of ``dequantized_linear``), reused by every int4 layer's
    prefill on this thread: a fresh allocation costs more in page faults than dequantizing into it."""
    buffer = getattr(_scratch_buffers, "tensor", None)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = _scratch_buffers.tensor = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _replace_linears(model: nn.Module, make, include_lm_head: bool) -> nn.Module:
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and (include_lm_head or name != "lm_head")
    ]
    for parent, name in targets:
        setattr(parent, name, make(getattr(parent, name)))
    return model


def cast_unquantized_(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the model's floating-point parameters and buffers to ``dtype``, but those of its quantized layers (their
    scales stay in the form their kernels read, their biases are added in the activations' dtype): a model quantized
    from 16-bit weights then computes in fp32 (``--int8 --dtype float32``) without an fp32 copy of the weights.
    Returns the model."""
    for module in model.modules():
        if isinstance(module, (BlockLinear, Int4Linear)):
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point():
                if isinstance(tensor, nn.Parameter):
                    tensor.data = tensor.data.to(dtype)
                else:
                    module._buffers[name] = tensor.to(dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype
    return model


def quantize_int8_(model: nn.Module, include_lm_head: bool = True, kernel: Kernel = "auto") -> nn.Module:
    """Replace the model's Linear layers by ``Int8Linear`` in place and return the model."""
    return _replace_linears(model, lambda linear: Int8Linear(linear, kernel), include_lm_head)


LmHead = Literal["int8", "int4", "keep"]


def quantize_int4_(model: nn.Module, group_size: int | None = None, lm_head: LmHead = "int8") -> nn.Module:
    """Replace the model's Linear layers by 4-bit ones in place and return the model.

    ``group_size=None`` (``--int4``): blocks of 32 with a bf16 scale each (``BlockLinear``, Q4_0's format and
    bytes) where qwen's block kernel runs (a CPU with AVX-512), else asymmetric groups of 128 (``Int4Linear``,
    GPTQ's layout: AVX2-only CPUs and CUDA). A number asks for ``Int4Linear`` groups of that size; a layer whose
    width it does not divide (only tiny test models) gets the largest group that does.

    The lm_head is the layer 4 bits hurt most and, for the small models, the largest read of a decode
    step (Qwen-1.8B's is 0.6 GB of bf16 against 0.7 GB for all its int4 blocks): ``lm_head="int8"``
    (the default) stores it as int8 (``Int8Linear``), close to lossless at half the bytes; "int4" like the
    rest; "keep" leaves it as it is (GPTQ's int4 folders keep it in 16 bits)."""

    def make(linear: nn.Linear) -> nn.Module:
        if group_size is None and linear.weight.device.type == "cpu" and qwen_int8_kernel() is not None:
            return BlockLinear(linear, bits=4)
        size = group_size or 128
        group = next((g for g in (size, 128, 64, 32) if g <= size and linear.in_features % g == 0), 32)
        return Int4Linear.from_linear(linear, group)

    if lm_head not in ("int8", "int4", "keep"):
        raise ValueError(f"lm_head must be 'int8', 'int4' or 'keep', not {lm_head!r}")
    _replace_linears(model, make, include_lm_head=False)
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Linear) and lm_head != "keep":
        model.lm_head = Int8Linear(head) if lm_head == "int8" else make(head)
    return model
