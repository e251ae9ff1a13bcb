"""qwen's int8 CPU kernel against PyTorch's, layer by layer, over Qwen-1.8B's shapes.

    python bench/int8_kernel.py                  # rows 1-32 x the five layer shapes (~4 min on 2 cores)
    python bench/int8_kernel.py --rows 8 --rounds 5
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/int8_kernel.py --rows 512 --shapes 0 1 2 3 --rounds 1
                                                 # a prompt's product against oneDNN without AMX (~2 min)

For each number of activation rows (bf16, as a bf16 model decodes) and each weight shape [N, K]
(attention qkv, attention out, MLP w1 and w2 fused, MLP c_proj, lm_head) it times four kernels:
``torch.ops.qwen.block_matmul`` on its float path (``QWEN_INT8_VNNI=0``) and on its integer (VNNI)
path, which serves every row count on CPUs with AVX-512 VNNI (elsewhere both columns are the float
path; from 24 rows the integer path is its matrix product, which a prompt takes where oneDNN has no AMX);
PyTorch's bf16 matmul (``F.linear``
on a bf16 copy of the weight, oneDNN, AMX where the CPU has it); and PyTorch's
``torch._weight_int8pack_mm``. Each call takes the next of copies of the weight that add up to 1 GiB
(int8; 2 GiB of bf16), more than the CPU's caches, so every call reads its weight from memory, as a
decode step does. The kernels take turns for ``--rounds`` rounds and keep their best time, so a slow
spell of a shared machine hits them alike. GB/s is the weight's bytes (qwen's int8: N*K and a bf16 scale
per 32 weights; PyTorch's int8: N*K and one per row; bf16: 2*N*K) over
the time: a kernel that keeps up with memory reads at the machine's bandwidth whatever the row
count; one that falls behind it as rows grow is compute-bound. The last two columns say how many
times faster the integer path is than the float path and than bf16.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwen.quantize import qwen_int8_kernel

SHAPES = [(6144, 2048), (2048, 2048), (11008, 2048), (2048, 5504), (151936, 2048)]
KERNELS = ["qwen float", "qwen vnni", "torch bf16", "torch int8pack"]
POOL_BYTES = 1 << 30


def best_time(fn: Callable[[], object], seconds: float) -> float:
    """The fastest of as many calls as fit in about ``seconds`` (at least three)."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 3 or spent < seconds:
        t = time.perf_counter()
        fn()
        t = time.perf_counter() - t
        best, spent, calls = min(best, t), spent + t, calls + 1
    return best


def rotating(kernel: Callable[[torch.Tensor], object], weights: torch.Tensor, vnni: bool | None = None):
    """``kernel`` on the next copy of the weight (``weights[i]``) each call; ``vnni`` picks the path
    of qwen's kernel, which reads QWEN_INT8_VNNI on each call."""
    turn = iter(range(1 << 62))

    def run() -> object:
        if vnni is not None:
            os.environ["QWEN_INT8_VNNI"] = "1" if vnni else "0"
        return kernel(weights[next(turn) % len(weights)])
    return run


def parse_args(doc: str, rows: list[int]) -> argparse.Namespace:
    """The options both kernel benches take (this one and bench/int4_kernel.py)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=rows)
    parser.add_argument("--shapes", type=int, nargs="+", default=range(len(SHAPES)),
                        help="which of the shapes (indices into " + str(SHAPES) + ")")
    parser.add_argument("--rounds", type=int, default=3, help="turns each kernel takes; its best is kept")
    parser.add_argument("--seconds", type=float, default=0.1, help="time per kernel per turn")
    return parser.parse_args()


def print_header(kernels: list[str], ratios: list[str], rounds: int) -> None:
    """The run's settings and the table's header: µs and GB/s per kernel, then the ratios."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {rounds} rounds\n")
    cols = [f"{k} {unit}" for k in kernels for unit in ("µs", "GB/s")] + ratios
    print("| rows | N x K | " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * len(cols))


def main() -> None:
    args = parse_args(__doc__, [1, 2, 4, 8, 16, 32])
    op = qwen_int8_kernel()
    assert op is not None, "qwen's int8 kernel is unavailable here (no AVX-512 or no compiler)"
    print_header(KERNELS, ["vnni / float", "vnni / bf16"], args.rounds)
    g = torch.Generator().manual_seed(0)
    for n, k in (SHAPES[i] for i in args.shapes):
        copies = -(-POOL_BYTES // (n * k))
        w = torch.empty(copies, n, k, dtype=torch.int8).random_(-127, 128, generator=g)
        wb = torch.empty(copies, n, k, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        s = (torch.rand(n, generator=g) / 1000).bfloat16()  # one scale per output channel: PyTorch's kernel
        s32 = (torch.rand(n, -(-k // 32), generator=g) / 1000).bfloat16()  # one per 32 channels: qwen's
        # (qwen's kernel reads w in its packed order: random bytes in either order time the same)
        for rows in args.rows:
            x = torch.randn(rows, k, generator=g).bfloat16()
            kernels = {
                "qwen float": rotating(lambda w, x=x, s32=s32: op(x, w, s32), w, vnni=False),
                "qwen vnni": rotating(lambda w, x=x, s32=s32: op(x, w, s32), w, vnni=True),
                "torch bf16": rotating(lambda w, x=x: F.linear(x, w), wb),
                "torch int8pack": rotating(lambda w, x=x, s=s: torch._weight_int8pack_mm(x, w, s), w),
            }
            best = dict.fromkeys(kernels, float("inf"))
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, fn in kernels.items():
                        best[name] = min(best[name], best_time(fn, args.seconds))
            os.environ.pop("QWEN_INT8_VNNI")
            cells = []
            for name in KERNELS:
                weight_bytes = {"torch bf16": 2 * n * k, "torch int8pack": n * k}.get(name, s32.nbytes + n * k)
                cells += [f"{best[name] * 1e6:.0f}", f"{weight_bytes / best[name] / 1e9:.1f}"]
            vnni = best["qwen vnni"]
            cells += [f"{best['qwen float'] / vnni:.2f}x", f"{best['torch bf16'] / vnni:.2f}x"]
            print(f"| {rows} | {n} x {k} | " + " | ".join(cells) + " |", flush=True)
        del w, wb


if __name__ == "__main__":
    main()
