"""qwen's bf16 CPU kernel against PyTorch's bf16 matmul (oneDNN), layer by layer, over Qwen-1.8B's shapes.

    python bench/bf16_kernel.py                                   # rows 1-128 x the five layer shapes
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/bf16_kernel.py   # oneDNN without AMX, as on an AMD EPYC

For each number of activation rows (a decode step's sequences) and each weight shape [N, K] (attention qkv,
attention out, MLP w1 and w2 fused, MLP c_proj, lm_head) it times ``torch.ops.qwen.bf16_matmul`` on its AMX path
(CPUs with AMX only) and on its AVX-512 BF16 path, and ``F.linear`` (oneDNN; with AMX where the CPU has it, unless
``ONEDNN_MAX_CPU_ISA`` caps it: on a Xeon, ``AVX512_CORE_BF16`` gives the choice a CPU without AMX faces). Each
call reads its weight from memory (copies adding up to 2 GiB take turns), as a decode step does; the kernels take
turns for ``--rounds`` rounds and keep their best. The engine runs the kernel for every decode step, so these
columns say what that costs or gains against oneDNN at each batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from int8_kernel import SHAPES, best_time, parse_args, print_header, rotating  # bench/int8_kernel.py
from machine import amx_settings, cpu_name  # bench/machine.py

from qwen.cpu_kernels import qwen_bf16_kernel

POOL_BYTES = 2 << 30


def main() -> None:
    args = parse_args(__doc__, [1, 2, 4, 8, 16, 32, 64, 128])
    op = qwen_bf16_kernel()
    assert op is not None, "qwen's bf16 kernel is unavailable here (no AVX-512 BF16 or no compiler)"
    kernels = ["qwen amx"] * torch.cpu._is_amx_tile_supported() + ["qwen avx512", "torch bf16"]
    print(f"{cpu_name()} ({amx_settings()})")
    print_header(kernels, [f"{k} / torch" for k in kernels[:-1]], args.rounds)
    g = torch.Generator().manual_seed(0)
    for n, k in (SHAPES[i] for i in args.shapes):
        w = torch.empty(-(-POOL_BYTES // (2 * n * k)), n, k, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        for rows in args.rows:
            x = torch.randn(rows, k, generator=g).bfloat16()
            fns = {"qwen amx": rotating(lambda w, x=x: op(x, w, None, True), w),
                   "qwen avx512": rotating(lambda w, x=x: op(x, w, None, False), w),
                   "torch bf16": rotating(lambda w, x=x: F.linear(x, w), w)}
            best = dict.fromkeys(kernels, float("inf"))
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name in kernels:
                        best[name] = min(best[name], best_time(fns[name], args.seconds))
            cells = [cell for name in kernels
                     for cell in (f"{best[name] * 1e6:.0f}", f"{2 * n * k / best[name] / 1e9:.1f}")]
            cells += [f"{best['torch bf16'] / best[name]:.2f}x" for name in kernels[:-1]]
            print(f"| {rows} | {n} x {k} | " + " | ".join(cells) + " |", flush=True)
        del w


if __name__ == "__main__":
    main()
