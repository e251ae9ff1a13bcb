"""qwen's int4 CPU kernel against PyTorch's int4 kernel and bf16 matmul, layer by layer, over Qwen-1.8B's shapes.

    python bench/int4_kernel.py                  # rows 1-64 x the five layer shapes (~3 min on 2 cores)
    python bench/int4_kernel.py --rows 1 8 --rounds 5
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 python bench/int4_kernel.py --rows 512 --shapes 0 1 2 3 --rounds 1
                                                 # a prompt's paths, oneDNN without AMX

For each number of activation rows (bf16, as a bf16 model decodes) and each weight shape [N, K] it
times, with groups of 128: ``torch.ops.qwen.int4_matmul`` (int8 activations, integer dot products;
what ``Int4Linear`` runs in a decode step); on CPUs with AVX-512 VNNI ``int4_product``, its matrix product
(what a prompt runs where PyTorch's bf16 matmul has no AMX); ``int4_dequantize`` to bf16 plus
PyTorch's matmul (what a prompt runs elsewhere); PyTorch's ``_weight_int4pack_mm_for_cpu``
(what ran before); and PyTorch's bf16 matmul (``F.linear``, oneDNN, AMX where the CPU has it). As in
``bench/int8_kernel.py`` (whose timing helpers this reuses), each call takes the next of copies of
the weight that add up to 1 GiB, so every call reads its weight from memory as a decode step does,
and the kernels take turns for ``--rounds`` rounds, keeping their best. GB/s is the weight's bytes
(int4: N*K/2 plus the group scales; bf16: 2*N*K) over the time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from int8_kernel import POOL_BYTES, SHAPES, best_time, parse_args, print_header, rotating  # bench/ on sys.path

from qwen.cpu_kernels import qwen_int4_kernel
from qwen.quantization.layers import VNNI

GROUP = 128
KERNELS = ["qwen int4", *["qwen product"] * VNNI, "qwen dequant + matmul", "torch int4", "torch bf16"]


def main() -> None:
    args = parse_args(__doc__, [1, 2, 4, 8, 16, 32, 64])
    op = qwen_int4_kernel()
    assert op is not None, "qwen's int4 kernel is unavailable here (no AVX2 or no compiler)"
    print_header(KERNELS, ["qwen / torch int4", "qwen / bf16"], args.rounds)
    g = torch.Generator().manual_seed(0)
    for n, k in (SHAPES[i] for i in args.shapes):
        int4_bytes = n * k // 2 + n * (k // GROUP) * 8
        copies = -(-POOL_BYTES // int4_bytes)
        # Random 4-bit values and group parameters: the kernels' speed does not depend on them.
        ours = torch.empty(copies, n, k // 2, dtype=torch.uint8).random_(0, 256, generator=g)
        scale_zero = torch.rand(n, k // GROUP, 2, generator=g) / 100
        q = torch.empty(n, k, dtype=torch.int32).random_(0, 16, generator=g)
        theirs = torch._convert_weight_to_int4pack_for_cpu(q, 8)
        theirs = torch.stack([theirs] * copies)  # the same packing, one copy per call
        scale_offset = (torch.rand(k // GROUP, n, 2, generator=g) / 100).bfloat16()
        wb = torch.empty(-(-2 * POOL_BYTES // (2 * n * k)), n, k, dtype=torch.bfloat16).normal_(0, 0.02, generator=g)
        for rows in args.rows:
            x = torch.randn(rows, k, generator=g).bfloat16()
            kernels = {
                "qwen int4": rotating(lambda w, x=x, sz=scale_zero: op(x, w, sz, GROUP), ours),
                "qwen product": rotating(
                    lambda w, x=x, sz=scale_zero: torch.ops.qwen.int4_product(x, w, sz, GROUP), ours),
                "qwen dequant + matmul": rotating(
                    lambda w, x=x, sz=scale_zero: F.linear(
                        x, torch.ops.qwen.int4_dequantize(w, sz, GROUP, torch.bfloat16)), ours),
                "torch int4": rotating(
                    lambda w, x=x, so=scale_offset: torch._weight_int4pack_mm_for_cpu(x, w, GROUP, so), theirs),
                "torch bf16": rotating(lambda w, x=x: F.linear(x, w), wb),
            }
            kernels = {name: kernels[name] for name in KERNELS}
            best = dict.fromkeys(kernels, float("inf"))
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, fn in kernels.items():
                        best[name] = min(best[name], best_time(fn, args.seconds))
            cells = []
            for name in KERNELS:
                weight_bytes = 2 * n * k if name == "torch bf16" else int4_bytes
                cells += [f"{best[name] * 1e6:.0f}", f"{weight_bytes / best[name] / 1e9:.1f}"]
            qwen = best["qwen int4"]
            cells += [f"{best['torch int4'] / qwen:.2f}x", f"{best['torch bf16'] / qwen:.2f}x"]
            print(f"| {rows} | {n} x {k} | " + " | ".join(cells) + " |", flush=True)
        del ours, theirs, wb


if __name__ == "__main__":
    main()
