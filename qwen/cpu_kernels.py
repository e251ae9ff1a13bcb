"""qwen's own CPU kernels (``qwen/csrc``): built on first use, once per machine, and their layers.

Decoding reads every weight once per token, so on a CPU its speed is the bandwidth at which a
kernel streams the weights. Three kernels do that better than PyTorch's on AVX-512 (int4: also AVX2) CPUs:

* ``torch.ops.qwen.block_matmul`` (``block_matvec.cpp``, "the int8 kernel"): weights in blocks of 32 with a bf16
  scale each, int8 (``--int8``, Q8_0's precision) or 4-bit (``--int4``, Q4_0's), AVX-512 (``qwen.quantize``);
* ``torch.ops.qwen.int4_matmul`` (``int4_matvec.cpp``): int4 layers in asymmetric groups of 128 or 256 (GPTQ's
  layout: GPTQ int4 folders, and ``--int4`` where the block kernel cannot run), with activations quantized to
  int8 for integer dot products (AVX-512 VNNI, or AVX2); ``int4_product``, its matrix product for a prompt's
  rows (AVX-512 VNNI; the block kernel has one inside ``block_matmul``);
* ``torch.ops.qwen.bf16_matmul`` (``bf16_matvec.cpp``): bf16 layers, on CPUs with AVX-512 BF16 dot
  products (``avx512_bf16``), on AMX tiles where the CPU has them. ``Bf16Linear`` is an ``nn.Linear`` that runs
  it for decode steps (bf16 activations, one token per sequence, no gradients) and PyTorch's matmul otherwise;
  models loaded onto the CPU get it (``use_cpu_kernels_``).

Each is compiled by ``torch.utils.cpp_extension`` (about 15 s; cached under
``~/.cache/torch_extensions`` or ``$TORCH_EXTENSIONS_DIR``) and needs a C++ compiler and ninja (a
dependency of this package). ``QWEN_INT8_KERNEL=torch``, ``QWEN_INT4_KERNEL=torch`` and
``QWEN_BF16_KERNEL=torch`` skip them. ``python -m qwen.cpu_kernels`` builds all three ahead of time (the
Docker image does, so a container starts without compiling); ``python -m qwen.cpu_kernels bf16`` builds one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Whether the bf16 kernel multiplies on AMX tiles (CPUs with AMX: Xeon Sapphire Rapids and later; QWEN_BF16_AMX=0
# keeps it to AVX-512 BF16, to compare). AMX reads each weight once for up to 32 activation rows at about the cost
# of one; AVX-512 is compute-bound past a few rows, as oneDNN is on a CPU without AMX.
#
# The kernel serves every decode step, however many sequences, so a sequence's numbers never depend on how many
# others decode with it. bench/bf16_kernel.py, 2-core Intel Xeon, 2026-12-07, the 1.8B layer shapes against
# PyTorch's matmul (oneDNN), each with the same instructions: on AMX 1.2-1.4x at 1 to 32 rows, 0.95-1.17x at 64,
# 0.75-0.92x at 128; on AVX-512 BF16 against oneDNN without AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16: what a CPU
# without AMX, e.g. an AMD EPYC, runs) 1.45-1.55x at 1 row, 1.5-1.7x at 8, 1.05-1.12x at 32, 0.94-1.04x at 64,
# 0.64-0.89x at 128: a cost only past 64 sequences. (AVX-512 alone against oneDNN *with* AMX is 0.7-1.0x at 8 rows:
# QWEN_BF16_AMX=0 on an AMX CPU is for comparisons.) Prompts stay with oneDNN (1.2-2.4x ours at 1024 rows).
BF16_AMX = os.environ.get("QWEN_BF16_AMX", "1") != "0" and torch.cpu._is_amx_tile_supported()

# Whether PyTorch's matmul (oneDNN) multiplies bf16 on AMX tiles: a CPU with AMX, unless ONEDNN_MAX_CPU_ISA holds
# oneDNN to an instruction set without it (e.g. AVX512_CORE_BF16, to compare with a CPU that has none).
_ONEDNN_ISA = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
ONEDNN_AMX = torch.cpu._is_amx_tile_supported() and (_ONEDNN_ISA in ("ALL", "DEFAULT") or "AMX" in _ONEDNN_ISA)


_rows = threading.local()


@contextlib.contextmanager
def decode_rows() -> Iterator[None]:
    """Within it (in this thread) every row counts as a decode step's (``one_token_each``), several tokens of one
    sequence too: a speculative verification forward (``qwen.speculative``) then gets, at each position, the
    numbers decoding those tokens one at a time would, from the same kernels."""
    _rows.decode = True
    try:
        yield
    finally:
        _rows.decode = False


def one_token_each(x: torch.Tensor) -> bool:
    """Whether a layer runs its decode kernel on ``x`` (quantized layers rather than a dequantized matmul,
    ``Bf16Linear`` rather than PyTorch's): when each sequence brings one token (``[..., 1, in]``, a decode step,
    however many sequences; or 2-D rows, one per sequence, as an lm_head over last positions gets). A prompt's
    tokens (``[batch, tokens > 1, in]``) take the dequantized weight (bf16: PyTorch's matmul) and one matmul: the
    kernels are matrix-vector loops whose time grows with every row (a 2048x5504 int8 layer: 5.7 ms at 32 rows
    against 9.0 ms dequantized, 172 against 27 ms at 1024), or qwen's integer matrix products where
    ``qwen.quantization.layers.integer_prompts`` (the block kernel's gives each row a decode step's bits; the
    int4 kernel's does not). The paths round differently, so choosing by the
    tokens each sequence brings, not by the batch's row count, keeps a request's numbers (and its greedy reply)
    the same whoever is batched with it; the engine never prefills one column alone. Within ``decode_rows``,
    always."""
    return x.dim() < 3 or x.shape[-2] == 1 or getattr(_rows, "decode", False)


def build_folder(name: str) -> Path:
    """Where ``csrc/{name}.cpp`` is built: one folder per source, torch and Python version, under
    ``$TORCH_EXTENSIONS_DIR`` or torch's default."""
    from torch.utils.cpp_extension import get_default_build_root

    tag = hashlib.sha256((Path(__file__).with_name("csrc") / f"{name}.cpp").read_bytes()).hexdigest()[:12]
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    return Path(root) / f"qwen_{name}-{tag}-torch{torch.__version__}-{python}"


# label: (source name in csrc/, compiler flags). The flags only let the compiler emit the instructions; each
# kernel checks that the CPU has them before it is used, so a build runs on any x86-64 machine.
KERNELS = {
    "int8": ("block_matvec", ["-mavx512f"]),
    "int4": ("int4_matvec", []),  # per-function targets: AVX-512 VNNI or AVX2, picked at run time
    "bf16": ("bf16_matvec", ["-mavx512f", "-mavx512bw", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]),
}


def _build(label: str, name: str, flags: list[str]) -> bool:
    """Compile and load ``csrc/{name}.cpp`` (once per source, torch and Python version); False with a
    warning naming the fix when it cannot be built. ``label`` names it in messages ("int8")."""
    from torch.utils.cpp_extension import load

    source, build = Path(__file__).with_name("csrc") / f"{name}.cpp", build_folder(name)
    try:  # everything that can fail (a read-only build folder, no compiler, no ninja) falls back with a warning
        if not build.exists():
            logger.warning("building qwen's %s CPU kernel in %s (once, about 15 s)", label, build)
            build.mkdir(parents=True, exist_ok=True)
        wait_for_build_lock(build / "lock", label)
        _put_ninja_on_path()
        # -fopenmp only compiles at::parallel_for's OpenMP loop: the symbols come from the libgomp that
        # libtorch_cpu already loaded, so the kernel shares PyTorch's threads instead of adding its own.
        load(name=f"qwen_{name}", sources=[str(source)], build_directory=str(build),
             extra_cflags=["-O3", "-fopenmp", *flags], is_python_module=False)
        return True
    except Exception as exc:
        warnings.warn(
            f"could not build qwen's {label} CPU kernel ({type(exc).__name__}: ...{str(exc)[-300:]}); PyTorch's "
            "slower kernel runs instead. To build it, install a C++ compiler (e.g. `apt install g++`) and "
            "`pip install ninja`.",
            stacklevel=3,
        )
        return False


STALE_LOCK_SECONDS = 300  # a build takes about 15 s; a lock this old was left by one that was killed


def wait_for_build_lock(lock: Path, label: str, stale_after: float = STALE_LOCK_SECONDS) -> None:
    """Wait while another process builds the kernel (torch keeps a ``lock`` file in the build folder while it
    compiles), saying so; remove a lock older than ``stale_after`` seconds. torch would wait for a lock left by
    a killed build forever, without a word."""
    said = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after:
            logger.warning("removing %s, left %.0f s ago by a build of qwen's %s kernel that did not finish",
                           lock, age, label)
            lock.unlink(missing_ok=True)
            return
        if not said:
            logger.warning("waiting for another process that is building qwen's %s kernel (%s; if none is, "
                           "delete that file)", label, lock)
            said = True
        time.sleep(0.5)


def _put_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is not there when a virtual
    environment's python runs without the environment being activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def qwen_int8_kernel():
    """qwen's AVX-512 block kernel for int8 and 4-bit blocks (``torch.ops.qwen.block_matmul``), or None where it
    is unavailable (no AVX-512, no compiler, or ``QWEN_INT8_KERNEL=torch``)."""
    if os.environ.get("QWEN_INT8_KERNEL", "auto") == "torch":
        return None
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("this CPU has no AVX-512: int8 layers use PyTorch's int8 kernel")
        return None
    if not _build("int8", *KERNELS["int8"]):
        return None
    # The output's shape and dtype, for torch.compile (the engine's compiled decode step).
    torch.library.register_fake("qwen::block_matmul")(lambda x, w, scales: x.new_empty(x.shape[0], w.shape[0]))
    torch.library.register_fake("qwen::block_dequantize")(
        lambda w, scales, dtype: w.new_empty(w.shape[0], 32 * scales.shape[1], dtype=dtype))
    return torch.ops.qwen.block_matmul


@functools.cache
def qwen_int4_kernel():
    """qwen's int4 kernels (``torch.ops.qwen.int4_matmul`` and ``int4_dequantize``, AVX-512 VNNI or AVX2,
    picked at run time), or None where they are unavailable (no AVX2, no compiler, or
    ``QWEN_INT4_KERNEL=torch``)."""
    if os.environ.get("QWEN_INT4_KERNEL", "auto") == "torch":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        logger.info("this CPU has no AVX2: int4 layers use PyTorch's int4 kernel")
        return None
    if not _build("int4", *KERNELS["int4"]):
        return None
    torch.library.register_fake("qwen::int4_matmul")(
        lambda x, packed, scale_zero, group_size, avx2=False: x.new_empty(x.shape[0], packed.shape[0]))
    torch.library.register_fake("qwen::int4_product")(
        lambda x, packed, scale_zero, group_size: x.new_empty(x.shape[0], packed.shape[0]))
    torch.library.register_fake("qwen::int4_dequantize")(
        lambda packed, scale_zero, group_size, dtype: packed.new_empty(packed.shape[0], 2 * packed.shape[1],
                                                                       dtype=dtype))
    return torch.ops.qwen.int4_matmul


@functools.cache
def qwen_bf16_kernel():
    """qwen's AVX-512 BF16 kernel (``torch.ops.qwen.bf16_matmul``), or None where it is unavailable
    (no ``avx512_bf16``, no compiler, or ``QWEN_BF16_KERNEL=torch``)."""
    if os.environ.get("QWEN_BF16_KERNEL", "auto") == "torch" or not torch.cpu._is_avx512_bf16_supported():
        return None
    if not _build("bf16", *KERNELS["bf16"]):
        return None
    torch.library.register_fake("qwen::bf16_matmul")(
        lambda x, w, bias=None, amx=True: x.new_empty(x.shape[0], w.shape[0]))
    return torch.ops.qwen.bf16_matmul


class Bf16Linear(nn.Linear):
    """An ``nn.Linear`` (same parameters, same state dict) whose decode steps (``one_token_each``: bf16
    activations on the CPU, no gradient to compute; any number of sequences) run qwen's bf16 kernel. Everything
    else (training, prompts, other dtypes or devices) runs PyTorch's matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16
                or not one_token_each(x)
                or not self.weight.is_contiguous()
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.qwen.bf16_matmul(flat, self.weight, self.bias, BF16_AMX)
        return out.reshape(*x.shape[:-1], self.out_features)


def use_cpu_kernels_(model: nn.Module) -> nn.Module:
    """Let every plain ``nn.Linear`` of ``model`` decode through qwen's bf16 kernel where it applies
    (see ``Bf16Linear``): the modules change class, their weights stay as they are. Does nothing where
    the kernel is unavailable (built here, on first use). Returns the model."""
    if qwen_bf16_kernel() is None:
        return model
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Bf16Linear
    return model


def build_all(labels: list[str] | None = None) -> bool:
    """Compile every kernel (or those of ``labels``: "int8", "int4", "bf16") now, whatever this CPU has: a
    container image built on one machine then starts without a compiler run (``python -m qwen.cpu_kernels
    [LABEL...]``, in docker/Dockerfile). True if all were built."""
    labels = list(KERNELS) if labels is None else labels
    return all([_build(label, *KERNELS[label]) for label in labels])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chosen = sys.argv[1:] or list(KERNELS)
    if unknown := [label for label in chosen if label not in KERNELS]:
        sys.exit(f"usage: python -m qwen.cpu_kernels [{' '.join(KERNELS)}] (unknown: {' '.join(unknown)})")
    ok = build_all(chosen)
    for label in chosen:
        print(f"{label}: {build_folder(KERNELS[label][0])}")
    sys.exit(0 if ok else 1)
