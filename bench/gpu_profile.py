"""Where a compiled decode step's time goes on a GPU (1.8B shape, bf16, random weights).

    python bench/gpu_profile.py                    # every variant
    python bench/gpu_profile.py --variants now     # one

First one layer's matmul in each weight format (bf16, int8, int4). Then the engine's compiled decode
step in variants (``VARIANTS``): "before" is the engine as it was (unfused weights, steps waiting for
the host), "now" what the server runs on CUDA (fused w1/w2, overlapped steps), and single changes
(the decode attention kernel among them). For each variant it reports, at batch 1
(and 8): the engine's tokens/s (wall clock, sampling and Python included), the GPU time of one step
(the compiled step replayed back to back, so the GPU never waits for the host), the host time between
steps (wall minus GPU), whether its greedy tokens equal the eager engine's, and from the profiler the
kernels one step launches, their total time and the heaviest of them. Against the weight bytes a step
reads this gives the share of the read bandwidth a step reaches. Last, transformers' Qwen2 on the same
weights (eager, and with its static cache, which it compiles), prefill, and a windowed model's prefill.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from generate import bandwidths, build_model, nbytes  # bench/generate.py (the script's folder is on sys.path)
from torch.nn.attention import SDPBackend

import qwen  # noqa: F401
from qwen.convert import to_qwen2
from qwen.engine import DECODE_ATTENTION, Engine
from qwen.modeling import QWenLMHeadModel
from qwen.quantize import quantize_int4_, quantize_int8_
from qwen.sampling import SamplingParams
from qwen.tokenizer import QWenTokenizer

CATEGORIES = [
    ("matmul", ("gemv", "gemm", "nvjet", "cutlass", "xmma", "sm90", "splitk", "int4", "int8", "mm_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "flex")),
    ("fused elementwise (triton)", ("triton",)),
]


def category(name: str) -> str:
    low = name.lower()
    return next((label for label, keys in CATEGORIES if any(k in low for k in keys)), "other")


# name -> (fused weights, overlapped steps, decode attention kernels (None: PyTorch's choice), weights)
FLASH = tuple(DECODE_ATTENTION)
VARIANTS = {
    "before": (False, False, None, "bf16"),  # the engine before issue #20
    "now": (True, True, None, "bf16"),  # what the server runs on CUDA now
    "int8": (True, True, None, "int8"),
    "int4": (True, True, None, "int4"),
    "overlap": (False, True, None, "bf16"),
    "now+flash": (True, True, FLASH, "bf16"),
    "now+math": (True, True, (SDPBackend.MATH,), "bf16"),
}


def build(fused: bool, weights: str) -> QWenLMHeadModel:
    model = build_model("1.8b", torch.bfloat16, "", torch.device("cuda"))
    if fused:
        model.fuse_weights_()
    if weights == "int8":
        quantize_int8_(model, kernel="torch")
    elif weights == "int4":
        quantize_int4_(model)
    return model


def decode_rate(engine: Engine, batch: int, new: int) -> float:
    prompts = [[(7 * i + 13 * j) % 150000 for j in range(32)] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new, do_sample=False)
    engine.generate(prompts, SamplingParams(max_new_tokens=4, do_sample=False))  # compiles
    engine.generate(prompts, params)  # second length bucket, if any

    def run(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.generate(prompts, SamplingParams(max_new_tokens=n, do_sample=False))
        torch.cuda.synchronize()
        return time.perf_counter() - t

    first = min(run(1) for _ in range(2))
    full = min(run(1 + new) for _ in range(2))
    return batch * new / (full - first)


def gpu_step_ms(engine: Engine, batch: int, steps: int = 50) -> float:
    """One decode step's GPU time: the compiled step called back to back with fixed inputs."""
    ids = engine.next_tokens[:batch, None]
    starts = torch.full((batch,), 40, device=engine.device)
    keys = engine.cache.begin(slice(0, batch), starts, 1, 41)
    mask = (torch.arange(keys, device=engine.device)[None] <= starts[:, None])[:, None, None, :]
    alpha = engine.alpha[:batch]
    with torch.inference_mode():
        for _ in range(3):
            engine._decode_logits(ids, starts[:, None], mask, alpha)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine._decode_logits(ids, starts[:, None], mask, alpha)
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps * 1e3


def profile_steps(engine: Engine, batch: int, steps: int = 16) -> tuple[int, float, list[tuple[str, int, float]]]:
    """Kernels per decode step, their GPU ms per step, and the heaviest kernels (name, count per
    step, µs per step), from the profiler over ``steps`` decode steps (prefill kernels excluded by
    subtracting a one-token run)."""
    prompts = [[(5 * i + 11 * j) % 150000 for j in range(32)] for i in range(batch)]

    def kernels(n: int) -> collections.Counter:
        totals: collections.Counter = collections.Counter()
        counts: collections.Counter = collections.Counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.generate(prompts, SamplingParams(max_new_tokens=n, do_sample=False))
            torch.cuda.synchronize()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                totals[e.name] += e.device_time
                counts[e.name] += 1
        return totals, counts

    t1, c1 = kernels(1)
    tn, cn = kernels(1 + steps)
    per_time = {k: (tn[k] - t1.get(k, 0)) / steps for k in tn}
    per_count = {k: (cn[k] - c1.get(k, 0)) / steps for k in cn}
    heavy = sorted(per_time, key=per_time.get, reverse=True)
    return (round(sum(per_count.values())), sum(per_time.values()) / 1e3,
            [(k, per_count[k], per_time[k]) for k in heavy])


def graph_time_us(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds per call of ``fn``, captured ``calls`` times in one CUDA graph and replayed, so
    launch overhead is gone (as in the engine's compiled step)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / (replays * calls) * 1e6


def weight_formats(n: int, k: int) -> dict:
    """name -> (function of the activations, weight bytes it reads) for one n x k layer."""
    from qwen.quantization.triton_int8 import int8_matmul
    from qwen.quantize import Int4Linear, quantize_blocks

    linear = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    w = linear.weight.detach()
    w8, s8 = quantize_blocks(w, block_size=k)  # one scale per output channel, as the Triton kernel takes
    s8 = s8[:, 0]
    formats = {
        "bf16 F.linear": (lambda x: torch.nn.functional.linear(x, w), w.numel() * 2),
        "int8 dequant+linear (before)": (lambda x: torch.nn.functional.linear(x, w8.to(x.dtype) * s8[:, None]),
                                         w.numel()),
        "int8 triton": (lambda x: torch.ops.qwen.int8_matmul_cuda(x, w8, s8), w.numel()),
    }
    for bn, bk in [(32, 256), (64, 128), (16, 512)]:
        formats[f"int8 triton {bn}x{bk}"] = (lambda x, bn=bn, bk=bk: int8_matmul(x, w8, s8, bn, bk), w.numel())
    formats["int4 tinygemm g128"] = (Int4Linear.from_linear(linear, 128), w.numel() // 2)
    return formats


def layer_kernels(read_bw: float) -> None:
    """One layer's matmul at 1 and 8 rows: bf16 against the int8 and int4 forms, in µs and GB/s of
    weight read (the layer shapes of the 1.8B model: c_attn, w1+w2 fused, c_proj, lm_head)."""
    from qwen.quantize import Int4Linear, dequantize_groups, quantize_groups

    linear = torch.nn.Linear(2048, 512, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(3, 2048, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize_groups(*quantize_groups(linear.weight, 4, 128)).t() + linear.bias.float()
    err = (Int4Linear.from_linear(linear, 128)(x).float() - ref).abs().max() / ref.abs().max()
    print(f"int4 layer on CUDA against its dequantized weight: max error {err:.2e} of the largest output")
    print("\n### One layer's matmul (CUDA graph replay)\n")
    print("| out x in | rows | kernel | µs | weight GB/s |\n|---|---:|---|---:|---:|")
    for n, k in [(6144, 2048), (11008, 2048), (2048, 5504), (151936, 2048)]:
        kernels = weight_formats(n, k)
        for rows in (1, 8):
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            for name, (fn, nbytes_) in kernels.items():
                try:
                    us = graph_time_us(lambda fn=fn, x=x: fn(x))
                    print(f"| {n} x {k} | {rows} | {name} | {us:.1f} | {nbytes_ / us / 1e3:,.0f} |")
                except Exception as exc:
                    print(f"| {n} x {k} | {rows} | {name} | failed: {type(exc).__name__}: {str(exc)[:120]} | |")


def greedy_tokens(engine: Engine, n: int = 64) -> list[int]:
    prompt = [(31 * j + 7) % 150000 for j in range(32)]
    return engine.generate([prompt], SamplingParams(max_new_tokens=n, do_sample=False))[0].output_ids


def run_variant(name: str, batches: list[int], args: argparse.Namespace, read_bw: float, rows: list[dict]) -> None:
    fused, overlap, attention, weights = VARIANTS[name]
    model = build(fused, weights)
    tokenizer = QWenTokenizer()
    weight_bytes = nbytes(model) - model.transformer.wte.weight.numel() * 2  # a decode reads one row of it
    eager = greedy_tokens(Engine(model, tokenizer, max_batch_size=1, max_model_len=512))
    for batch in batches:
        engine = Engine(model, tokenizer, max_batch_size=batch, max_model_len=512, compile=True, overlap=overlap,
                        decode_attention=attention)
        t = time.perf_counter()
        rate = decode_rate(engine, batch, args.new_tokens)
        compile_s = time.perf_counter() - t
        gpu_ms = gpu_step_ms(engine, batch)
        wall_ms = batch / rate * 1e3
        row = {"variant": name, "batch": batch, "tok/s": rate, "ms/step": wall_ms, "GPU ms/step": gpu_ms,
               "host ms/step": max(wall_ms - gpu_ms, 0.0), "weights GB": weight_bytes / 1e9}
        if batch == 1:
            same = greedy_tokens(engine)
            row["greedy = eager"] = next((i for i, (a, b) in enumerate(zip(same, eager, strict=True)) if a != b),
                                         len(eager))
        print(f"\n#### {name}, batch {batch}: {rate:,.0f} tok/s ({wall_ms:.3f} ms per step; first runs incl. "
              f"compile {compile_s:.0f} s); GPU time of a step replayed back to back {gpu_ms:.3f} ms, host time "
              f"between steps {row['host ms/step']:.3f} ms")
        if batch == 1 and name in args.profile:
            count, kernel_ms, heavy = profile_steps(engine, batch)
            row["kernels"] = count
            print(f"- {count} kernels per step, {kernel_ms:.3f} ms of kernel time; weights read per step "
                  f"{weight_bytes / 1e9:.2f} GB -> {weight_bytes / (kernel_ms / 1e3) / 1e9:,.0f} GB/s over kernel "
                  f"time, {100 * weight_bytes / (kernel_ms / 1e3) / read_bw:.0f}% of the read bandwidth")
            by_cat: collections.Counter = collections.Counter()
            n_cat: collections.Counter = collections.Counter()
            for k, c, us in heavy:
                by_cat[category(k)] += us
                n_cat[category(k)] += c
            print("- by kind: " + "; ".join(f"{c} {by_cat[c] / 1e3:.3f} ms ({n_cat[c]:.0f} kernels)" for c in by_cat))
            print("\n| kernel | per step | µs per step |\n|---|---:|---:|")
            for k, c, us in heavy[: args.top]:
                print(f"| `{k[:90]}` | {c:.0f} | {us:.1f} |")
        rows.append(row)
        del engine
        torch.cuda.empty_cache()


def qwen2_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """transformers' Qwen2 on the same weights: plain generate (eager) and with its static cache, which
    transformers compiles itself; plus the prefill of both models."""
    model = build(False, "bf16")
    qwen2 = to_qwen2(model)
    for label, extra in [("transformers Qwen2", {}), ("transformers Qwen2, static cache (compiled)",
                                                       {"cache_implementation": "static"})]:
        for batch in (1, 8):
            ids = torch.randint(0, 150000, (batch, 32), device="cuda")

            def run(n: int, ids=ids, extra=extra) -> float:
                torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    qwen2.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0, **extra)
                torch.cuda.synchronize()
                return time.perf_counter() - t

            try:
                run(4), run(4)
                first = min(run(1) for _ in range(2))
                full = min(run(1 + args.new_tokens) for _ in range(2))
                rate = batch * args.new_tokens / (full - first)
                rows.append({"variant": label, "batch": batch, "tok/s": rate, "ms/step": batch / rate * 1e3})
                print(f"\n#### {label}, batch {batch}: {rate:,.0f} tok/s")
            except Exception as exc:
                print(f"\n#### {label}, batch {batch}: FAILED {type(exc).__name__}: {str(exc)[:500]}")
    prefill_rows({"qwen": model.transformer, "transformers Qwen2": qwen2.model}, args.prefill, "prefill", rows)


def prefill_rows(models: dict, length: int, label: str, rows: list[dict]) -> None:
    ids = torch.randint(0, 150000, (1, length), device="cuda")
    for name, m in models.items():
        with torch.inference_mode():
            m(ids[:, :64])
            m(ids)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                m(ids)
            torch.cuda.synchronize()
        rate = 3 * length / (time.perf_counter() - t)
        rows.append({"variant": f"{label} {length} tokens: {name}", "batch": 1, "tok/s": rate})
        print(f"\n#### {label} of {length} tokens, {name}: {rate:,.0f} tok/s")


def window_rows(args: argparse.Namespace, rows: list[dict]) -> None:
    """A model whose every layer attends over a 512-token window: our prefill with FlexAttention (a
    block mask) and with a dense masked SDPA (the default), against Qwen2's sliding window."""
    model = build_model("1.8b", torch.bfloat16, "", torch.device("cuda"), use_window_attn=True, window_size=512)
    qwen2 = to_qwen2(model)
    ids = torch.randint(0, 150000, (1, 1024), device="cuda")
    logits = {}
    for kernel in ("sdpa", "flex_attention"):  # every layer reads the model's one config
        model.config._attn_implementation = kernel
        with torch.inference_mode():
            logits[kernel] = model(ids).logits.float()
        prefill_rows({f"qwen ({kernel})": model.transformer}, args.window_prefill, "window-512 prefill", rows)
    with torch.inference_mode():
        theirs = qwen2(ids).logits.float()
    print(f"\nwindowed model, 1024 tokens, bf16: max |flex - sdpa| "
          f"{(logits['flex_attention'] - logits['sdpa']).abs().max():.3f}, max |sdpa - Qwen2| "
          f"{(logits['sdpa'] - theirs).abs().max():.3f} (logits up to {theirs.abs().max():.1f})")
    prefill_rows({"transformers Qwen2": qwen2.model}, args.window_prefill, "window-512 prefill", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch8", nargs="*", default=["before", "now"], help="variants also run at batch 8")
    parser.add_argument("--profile", nargs="*", default=["before", "now", "int4"],
                        help="variants whose batch-1 step is profiled kernel by kernel")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=1024)
    parser.add_argument("--window-prefill", type=int, default=8192)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="first time one layer's matmul in each weight format")
    parser.add_argument("--qwen2", action=argparse.BooleanOptionalAction, default=True,
                        help="also run transformers' Qwen2 on the same weights, and the prefill and window rows")
    args = parser.parse_args()
    bw = bandwidths(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, read {bw['read'] / 1e9:,.0f} GB/s, "
          f"copy {bw['copy'] / 1e9:,.0f} GB/s")
    if args.kernels:
        layer_kernels(bw["read"])
    rows: list[dict] = []
    jobs = [(lambda n=n: run_variant(n, [1, 8] if n in args.batch8 else [1], args, bw["read"], rows), n)
            for n in args.variants]
    if args.qwen2:  # after the first four variants: the rest only single out one change each
        jobs[4:4] = [(lambda: qwen2_rows(args, rows), "qwen2"), (lambda: window_rows(args, rows), "window")]
    for job, name in jobs:
        try:
            job()
        except Exception as exc:  # one broken part must not cost the others' figures
            print(f"\n#### {name}: FAILED {type(exc).__name__}: {str(exc)[:2000]}")
        torch.cuda.empty_cache()
        print_table(rows)


def print_table(rows: list[dict]) -> None:
    cols = ["variant", "batch", "tok/s", "ms/step", "GPU ms/step", "host ms/step", "kernels", "weights GB",
            "greedy = eager"]
    print("\n### Summary\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for row in rows:
        cells = [row.get(c, "") for c in cols]
        print("| " + " | ".join(f"{c:,.3f}" if isinstance(c, float) else str(c) for c in cells) + " |")


if __name__ == "__main__":
    main()
