"""Weight-only int8 quantization of Linear layers (``quantize="int8"`` / ``--int8``).

Decoding one token reads every weight once, so on a CPU its speed is set by memory bandwidth:
int8 weights move half the bytes of bf16. Each output channel gets one scale (symmetric,
round-to-nearest). For a few rows of activations (decoding) the layer multiplies the int8 weight
directly: with qwen's own AVX-512 kernel (``qwen/csrc/int8_matvec.cpp``, compiled once per machine
on first use) or, where that cannot be built, PyTorch's ``_weight_int8pack_mm``. For many rows (a
prefill) and off the CPU it dequantizes on the fly and runs one matmul.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# The int8 kernels are matrix-vector loops: their time grows with every row, so past a few dozen
# rows (a prefill) dequantizing the weight and running one matmul is faster (measured on a
# 2048x5504 layer: 32 rows 5.7 vs 9.0 ms, 1024 rows 172 vs 27 ms).
INT8_KERNEL_MAX_ROWS = 32

Kernel = Literal["auto", "qwen", "torch"]


@functools.cache
def qwen_int8_kernel():
    """qwen's AVX-512 int8 kernel (``torch.ops.qwen.int8_matmul``), or None where it is unavailable.

    It is compiled by ``torch.utils.cpp_extension`` the first time (about 15 s; cached under
    ``~/.cache/torch_extensions``, or ``$TORCH_EXTENSIONS_DIR``) and needs a C++ compiler and ninja
    (a dependency of this package). ``QWEN_INT8_KERNEL=torch`` skips it and uses PyTorch's kernel."""
    if os.environ.get("QWEN_INT8_KERNEL", "auto") == "torch":
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("this CPU has no AVX-512: int8 layers use PyTorch's int8 kernel")
        return None
    from torch.utils.cpp_extension import get_default_build_root, load

    source = Path(__file__).with_name("csrc") / "int8_matvec.cpp"
    # One folder per source, torch and Python version, so a stale build is never loaded.
    tag = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    build = Path(root) / f"qwen_int8_matvec-{tag}-torch{torch.__version__}-{python}"
    if not build.exists():
        logger.warning("building qwen's int8 CPU kernel in %s (once, about 15 s)", build)
        build.mkdir(parents=True, exist_ok=True)
    _put_ninja_on_path()
    try:
        # -fopenmp only compiles at::parallel_for's OpenMP loop: the symbols come from the libgomp that
        # libtorch_cpu already loaded, so the kernel shares PyTorch's threads instead of adding its own.
        load(
            name="qwen_int8_matvec", sources=[str(source)], build_directory=str(build),
            extra_cflags=["-O3", "-mavx512f", "-fopenmp"], is_python_module=False,
        )
        # The output's shape and dtype, for torch.compile (the engine's compiled decode step).
        torch.library.register_fake("qwen::int8_matmul")(lambda x, w, scales: x.new_empty(x.shape[0], w.shape[0]))
        return torch.ops.qwen.int8_matmul
    except Exception as exc:  # no compiler, no ninja, ...
        warnings.warn(
            f"could not build qwen's int8 CPU kernel ({type(exc).__name__}: ...{str(exc)[-300:]}); int8 layers use "
            "PyTorch's slower kernel. To build it, install a C++ compiler (e.g. `apt install g++`) "
            "and `pip install ninja`; set QWEN_INT8_KERNEL=torch to skip it.",
            stacklevel=2,
        )
        return None


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is not there when a virtual
    environment's python runs without the environment being activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def quantize_rows(w: torch.Tensor, block_rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest int8 with one fp32 scale per row: ``w ~ q * scale[:, None]``.

    Works through ``block_rows`` rows at a time, so its fp32 temporaries stay a few MiB instead of
    several copies of the whole matrix (a 7B model's lm_head alone is 2.5 GB in fp32)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for start in range(0, w.shape[0], block_rows):
        rows = slice(start, start + block_rows)
        block = w[rows].to(torch.float32, copy=True)  # never divide the caller's weight in place
        scale[rows] = (block.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q[rows] = block.div_(scale[rows, None]).round_().clamp_(-128, 127)
    return q, scale


class Int8Linear(nn.Module):
    """A Linear layer whose weight is stored as int8 with one scale per output channel.

    ``kernel`` picks the CPU int8 kernel for few rows: "qwen" (needs AVX-512 and a compiler),
    "torch" (PyTorch's), or "auto" (qwen's where it can be built)."""

    def __init__(self, linear: nn.Linear, kernel: Kernel = "auto") -> None:
        super().__init__()
        weight, scales = quantize_rows(linear.weight.detach())
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.use_qwen_kernel = kernel != "torch" and qwen_int8_kernel() is not None
        if kernel == "qwen" and not self.use_qwen_kernel:
            raise RuntimeError(
                "kernel='qwen' needs an AVX-512 CPU and a C++ toolchain to build qwen's int8 kernel "
                "(see the warning above); use kernel='auto' to fall back to PyTorch's"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        scales = self.scales.to(x.dtype)
        if x.device.type != "cpu" or flat.shape[0] > INT8_KERNEL_MAX_ROWS:
            out = F.linear(flat, self.weight.to(x.dtype) * scales[:, None])
        elif self.use_qwen_kernel:
            out = torch.ops.qwen.int8_matmul(flat, self.weight, scales)
        else:
            out = torch._weight_int8pack_mm(flat.contiguous(), self.weight, scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


def quantize_int8_(model: nn.Module, include_lm_head: bool = True, kernel: Kernel = "auto") -> nn.Module:
    """Replace the model's Linear layers by ``Int8Linear`` in place and return the model."""
    targets = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and (include_lm_head or name != "lm_head")
    ]
    for parent, name in targets:
        setattr(parent, name, Int8Linear(getattr(parent, name), kernel))
    return model
