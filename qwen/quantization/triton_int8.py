"""The CUDA int8 weight-only matmul for few rows (decoding): one Triton kernel.

A batch-1 decode step reads every weight once, so an int8 weight should take half the time of a
bf16 one. Converting the weight to bf16 first and running cuBLAS writes and reads it again (10x
slower than bf16 on an H200), and PyTorch's ``_weight_int8pack_mm`` has no fast CUDA kernel for
this shape; this kernel streams the int8 rows once, multiplies in the activations' dtype with fp32
accumulation, and applies the per-row scale at the end: ``y = (x @ q.T) * scale``.

``torch.ops.qwen.int8_matmul_cuda`` wraps it as an opaque op (with a shape function), so
torch.compile and CUDA graphs take it as one kernel. Triton is imported on first use only.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

# Rows of activations one program multiplies: tl.dot needs at least 16.
BLOCK_M = 16


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def int8_matmul(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                        other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                        other=0)
            if IEEE:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        scale = tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        y = acc * scale[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    return int8_matmul


def blocks(n: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K): narrow row blocks for narrow layers, so that enough programs run to keep
    every multiprocessor streaming (a 2048-row layer gives 128 programs)."""
    return (16 if n <= 8192 else 32), 256


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                block_n: int | None = None, block_k: int | None = None) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] int8 * scales [N]).T`` for M <= 16, in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if m > BLOCK_M:
        raise ValueError(f"the int8 kernel takes at most {BLOCK_M} rows, got {m}")
    x, weight = x.contiguous(), weight.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    default_n, default_k = blocks(n)
    block_n, block_k = block_n or default_n, block_k or default_k
    grid = (-(-n // block_n),)
    _kernel()[grid](x, weight, scales, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
                    BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    return y


@torch.library.custom_op("qwen::int8_matmul_cuda", mutates_args=())
def int8_matmul_op(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if not _broken:
        try:
            return int8_matmul(x, weight, scales)
        except Exception as exc:  # a Triton or driver that cannot build it: slow but right, and said once
            _broken.append(exc)
            warnings.warn(f"qwen's Triton int8 kernel failed ({type(exc).__name__}: {str(exc)[:300]}); int8 layers "
                          "on CUDA dequantize their weights instead (correct, but slower than bf16)", stacklevel=2)
    return torch.nn.functional.linear(x, weight.to(x.dtype) * scales[:, None])


_broken: list[Exception] = []  # the kernel's failure, once it failed


@int8_matmul_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@functools.cache
def available() -> bool:
    """Whether int8 layers on CUDA use the kernel: asked for with ``QWEN_TRITON_INT8=1`` (it has not yet run on a
    GPU: until ``bench/gpu_check.sh`` has passed on one, the dequantizing path stays the default) and Triton
    can be imported (it comes with PyTorch's CUDA builds)."""
    if os.environ.get("QWEN_TRITON_INT8") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
