"""Generation speed and memory: our engine vs ``generate()`` of our model vs transformers' Qwen2.

    python bench/generate.py                 # Qwen-1.8B shape (random bf16 weights) + tiny checkpoint
    python bench/generate.py --shape tiny    # only the tiny checkpoint (seconds)
    python bench/generate.py --device cuda --compile --new-tokens 64   # on a GPU, with the compiled step

All runners share one set of weights (Qwen2 gets views of ours; the int8 runners quantize copies)
and run in one process, taking turns for ``--rounds`` rounds and keeping their best, so their ratios
are comparable even though absolute timings drift between runs and within one. Decode tokens/s is
measured as extra tokens over extra time (a run of 1 + N tokens minus a run of 1 token, same
prompt), so prompt processing is excluded; prefill tokens/s is the prompt length over the time to
the first token. A batch-1 decode reads every weight once per token, so its memory-bandwidth
ceiling is bandwidth / the bytes a decode step reads, reported for a copy's and for a pure read's
bandwidth (see ``bandwidths``). Those bytes are the weights less the embedding table, of which a step reads
one row per sequence ("read GiB"; "weights GiB" counts it whole).
Memory: "weights GiB" is the runner's parameters and buffers, "working GiB" how far the process's
resident memory rose during a 1024-token prefill and a decode at the largest batch (KV cache, activations,
temporaries), measured after handing free heap pages back to the OS; on a GPU, how far PyTorch's
peak allocated memory rose.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peak_rss import PeakRSS  # bench/peak_rss.py (the script's folder is on sys.path)
from results import add_json_arg, save

import qwen  # noqa: F401
from qwen import cpu_kernels
from qwen.config import QWenConfig
from qwen.convert import to_qwen2
from qwen.cpu_kernels import use_cpu_kernels_
from qwen.engine import Engine
from qwen.modeling import QWenLMHeadModel
from qwen.quantize import quantize_int8_, qwen_int8_kernel
from qwen.sampling import SamplingParams
from qwen.tiny import make_tiny_checkpoint
from qwen.tokenizer import QWenTokenizer

Runner = Callable[[torch.Tensor, int], object]  # (prompt ids [batch, len], new tokens) -> output
SHAPES = {
    "1.8b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=11008),
}


STREAM_READ_C = r"""
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char** argv) {  /* GB/s of the best of five summing passes over 1 GiB */
  size_t bytes = (size_t)1 << 30, n = bytes / sizeof(int64_t);
  omp_set_num_threads(atoi(argv[1]));
  int64_t* a = aligned_alloc(64, bytes);
  #pragma omp parallel for
  for (size_t i = 0; i < n; ++i) a[i] = (int64_t)i;
  double best = 1e9;
  int64_t total = 0;
  for (int r = 0; r < 5; ++r) {
    double t = omp_get_wtime();
    int64_t sum = 0;
    #pragma omp parallel for reduction(+ : sum)
    for (size_t i = 0; i < n; ++i) sum += a[i];
    t = omp_get_wtime() - t;
    total += sum;
    if (t < best) best = t;
  }
  printf("%.3f %lld\n", bytes / best / 1e9, (long long)total);
  return 0;
}
"""


def stream_read(threads: int) -> float | None:
    """Bytes/s of a plain C loop summing a 1 GiB array on ``threads`` OpenMP threads, compiled here with
    ``-O3 -march=native`` (the compiler vectorizes it): a read ceiling that owes nothing to our kernels. None
    without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        source, program = Path(tmp) / "read.c", Path(tmp) / "read"
        source.write_text(STREAM_READ_C)
        built = subprocess.run([compiler, "-O3", "-march=native", "-fopenmp", str(source), "-o", str(program)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return None
        out = subprocess.run([str(program), str(threads)], capture_output=True, text=True, check=True).stdout
    return float(out.split()[0]) * 1e9


def bandwidths(device: torch.device, nbytes: int = 1 << 30) -> dict[str, float]:
    """Memory bandwidth in bytes/s, measured two ways on a 1 GiB buffer.

    "copy": bytes copied per second (``dst.copy_(src)``, best of five), the ceiling issue #5 names. A copy
    also writes, so a read-only stream can beat it. "read": on a CPU, a plain C loop summing the buffer
    (``stream_read``: 30.6 GB/s with 2 threads on the 2-core Xeon, against about 20 for ``amax``), or
    ``amax`` over fp32 where that is faster or no C compiler exists: the ceiling of a batch-1 decode, which
    only reads weights. It owes nothing to our kernels (kernels that prefetch further ahead can pass it)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    read = nbytes / min(timed(src.amax) for _ in range(5))
    if device.type == "cpu":
        read = max(read, stream_read(torch.get_num_threads()) or 0.0)
    return {"copy": nbytes / min(timed(lambda: dst.copy_(src)) for _ in range(5)), "read": read}


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, its GPU work included."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else lambda: None
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def hf_runner(model) -> Runner:
    def run(prompts: torch.Tensor, new: int) -> object:
        with torch.inference_mode():
            return model.generate(
                prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, repetition_penalty=1.0, eos_token_id=None, pad_token_id=0,
            )
    return run


def engine_runner(engine: Engine) -> Runner:
    def run(prompts: torch.Tensor, new: int) -> object:
        return engine.generate(prompts.tolist(), SamplingParams(max_new_tokens=new, do_sample=False))
    return run


def without_amx(run: Runner) -> Runner:
    """``run`` with the bf16 kernel kept to AVX-512 (``QWEN_BF16_AMX=0``'s path): AMX's gain in the same run."""
    def wrapped(prompts: torch.Tensor, new: int) -> object:
        cpu_kernels.BF16_AMX = False
        try:
            return run(prompts, new)
        finally:
            cpu_kernels.BF16_AMX = True
    return wrapped


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``), so that the next run's
    rise in resident memory counts every page it uses, not only those beyond earlier runs' leftovers."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is then a lower bound
        pass


def working_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes the process's memory rose by while ``fn`` ran: resident memory on the CPU, PyTorch's
    allocated GPU memory on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        return torch.cuda.max_memory_allocated() - before
    release_free_memory()
    before = PeakRSS.rss()
    with PeakRSS() as mem:
        fn()
    return mem.peak - before


def measure(run: Runner, device: torch.device, prompt_len: int, prefill_len: int, new_tokens: int,
            memory: bool, batches: tuple[int, ...] = (1, 8)) -> dict[str, float]:
    """One round of every measurement for one runner (the same prompts every round): decode at each batch size
    of ``batches``, and a prefill; with ``memory``, also an untimed pass for its working memory: a prefill of
    ``prefill_len`` then a decode at the largest batch."""
    gen = torch.Generator().manual_seed(0)
    row = {}
    prompts = {batch: torch.randint(0, 150000, (batch, prompt_len), generator=gen).to(device) for batch in batches}
    for batch, ids in prompts.items():
        run(ids, 2)  # warm-up
        first = min(timed(lambda p=ids: run(p, 1)) for _ in range(2))
        full = timed(lambda p=ids: run(p, 1 + new_tokens))
        # A slow spell during the short run can make the difference meaningless: then no figure this round.
        row[f"decode b{batch} tok/s"] = batch * new_tokens / (full - first) if full > first else float("nan")
    long_prompt = torch.randint(0, 150000, (1, prefill_len), generator=gen).to(device)
    run(long_prompt[:, :64], 1)  # the first run at a new length also pays for allocations
    row["prefill tok/s"] = prefill_len / timed(lambda: run(long_prompt, 1))
    if memory:
        largest = prompts[max(batches)]
        row["working GiB"] = working_memory(lambda: (run(long_prompt, 1), run(largest, 1 + new_tokens)), device)
        row["working GiB"] /= 2**30
    return row


def best_of_rounds(runners: dict[str, Runner], rounds: int, device: torch.device, *sizes: int,
                   batches: tuple[int, ...] = (1, 8)) -> list[dict]:
    """The runners take turns, ``rounds`` times, so a slow spell of this shared machine hits them all
    alike instead of one runner's whole row; each keeps its best rate (and its working memory from
    the first round)."""
    rows = {name: {"runner": name} for name in runners}
    for round_ in range(rounds):
        for name, run in runners.items():
            for key, value in measure(run, device, *sizes, memory=round_ == 0, batches=batches).items():
                rows[name][key] = max(rows[name].get(key, 0.0), value)
    return list(rows.values())


def build_model(shape: str, dtype: torch.dtype, tmp: str, device: torch.device, **overrides) -> QWenLMHeadModel:
    """A model of ``shape`` with random weights (``overrides``: config fields of a non-tiny shape)."""
    if shape == "tiny":
        path = make_tiny_checkpoint(os.path.join(tmp, "tiny"))
        return QWenLMHeadModel.from_pretrained(path, dtype=dtype).to(device).eval()
    config = QWenConfig(**{**SHAPES[shape], **overrides})
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "ln" in name else 0.0, 0.1 if "ln" in name else 0.02)
    if device.type == "cpu" and dtype == torch.bfloat16:
        use_cpu_kernels_(model)  # as from_pretrained does for a bf16 model on the CPU
    return model.eval()


def nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def decode_read_bytes(model: torch.nn.Module) -> int:
    """The bytes a batch-1 decode step reads: every weight, but of the embedding table one row."""
    table = model.get_input_embeddings().weight
    return nbytes(model) - (table.shape[0] - 1) * table.shape[1] * table.element_size()


def bench(shape: str, dtype: torch.dtype, args: argparse.Namespace, bandwidth: dict[str, float]) -> list[dict]:
    """Print one shape's table and return its rows (with the read ceiling each implies, for the charts)."""
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(shape, dtype, tmp, device)
    tokenizer = QWenTokenizer()
    max_len = max(args.prefill, 64) + args.new_tokens + 8

    def engine(weights: QWenLMHeadModel, compile: bool = False) -> Runner:
        # prefix cache off: the rounds repeat one prompt, whose prefill is measured
        return engine_runner(Engine(weights, tokenizer, max_batch_size=max(args.batches), max_model_len=max_len,
                                    compile=compile,
                                    prefix_cache_bytes=0))

    models = {"qwen engine": model, "qwen model.generate": model, "transformers Qwen2": to_qwen2(model)}
    runners = {
        "qwen engine": engine(model),
        "qwen model.generate": hf_runner(model),
        "transformers Qwen2": hf_runner(models["transformers Qwen2"]),
    }
    if cpu_kernels.BF16_AMX and dtype == torch.bfloat16 and device.type == "cpu":
        models["qwen engine, bf16 AVX-512 only"] = model
        runners["qwen engine, bf16 AVX-512 only"] = without_amx(engine(model))
    if args.compile:
        models["qwen engine compiled"] = model
        runners["qwen engine compiled"] = engine(model, compile=True)
    # int8 weights (a CPU feature) with each kernel this machine can run (qwen's needs AVX-512 and a compiler).
    kernels = ["qwen"] * (qwen_int8_kernel() is not None) + ["torch"] if device.type == "cpu" else []
    for kernel in kernels:
        name = f"qwen engine int8 ({kernel} kernel)"
        models[name] = quantize_int8_(copy.deepcopy(model), kernel=kernel)
        runners[name] = engine(models[name])
    rows = best_of_rounds(runners, args.rounds, device, 32, args.prefill, args.new_tokens, batches=args.batches)

    weight_bytes = decode_read_bytes(model)
    reference = next(row for row in rows if row["runner"] == "transformers Qwen2")["decode b1 tok/s"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n### {shape} shape, {str(dtype).removeprefix('torch.')}, {weight_bytes / 2**30:.2f} GiB read per token, "
          f"{where}, best of {args.rounds} rounds\n")
    for kind, rate in bandwidth.items():
        print(f"{kind} bandwidth {rate / 1e9:.1f} GB/s -> batch-1 decode ceiling {rate / weight_bytes:.2f} tok/s")
    print()
    top = max(args.batches)
    cols = ["runner", "decode b1 tok/s", "% of copy ceiling", "% of read ceiling", "vs Qwen2 b1",
            *(f"decode b{n} tok/s" for n in args.batches[1:]), f"b{top}/b1", "prefill tok/s", "weights GiB",
            "read GiB", "working GiB"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in rows:
        b1 = row["decode b1 tok/s"]
        row["weights GiB"] = nbytes(models[row["runner"]]) / 2**30
        row["read GiB"] = decode_read_bytes(models[row["runner"]]) / 2**30
        for kind, rate in bandwidth.items():
            row[f"% of {kind} ceiling"] = 100 * b1 * row["read GiB"] * 2**30 / rate
        row["vs Qwen2 b1"] = b1 / reference
        row[f"b{top}/b1"] = row[f"decode b{top} tok/s"] / b1
        print("| " + " | ".join(row[c] if isinstance(row[c], str) else f"{row[c]:.2f}" for c in cols) + " |")
        for kind, rate in bandwidth.items():
            row[f"{kind} ceiling tok/s"] = rate / (row["read GiB"] * 2**30)
    return rows


def batch_sizes(text: str) -> tuple[int, ...]:
    sizes = tuple(sorted({int(n) for n in text.split(",") if n.strip()}))
    if not sizes or sizes[0] != 1:
        raise argparse.ArgumentTypeError("batch sizes are positive integers, 1 among them (the ceiling's reference)")
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["all", "tiny", "1.8b"], default="all")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=1024, help="prompt length for the prefill measurement")
    parser.add_argument("--rounds", type=int, default=3, help="turns each runner takes; its best is reported")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--compile", action="store_true", help="also run the engine with its compiled decode step")
    parser.add_argument("--batches", type=batch_sizes, default=(1, 8), metavar="N,N,...",
                        help="decode batch sizes, 1 first (default: 1,8; e.g. 1,2,4,8,16 for the chart's curve)")
    add_json_arg(parser)
    args = parser.parse_args()
    bandwidth = bandwidths(torch.device(args.device))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    tables = {}
    if args.shape in ("all", "tiny"):
        tables["tiny fp32"] = bench("tiny", torch.float32, argparse.Namespace(**{**vars(args), "new_tokens": 64}),
                                    bandwidth)
    if args.shape in ("all", "1.8b"):
        tables["1.8b bf16"] = bench("1.8b", torch.bfloat16, args, bandwidth)
    save(args.json, "generate", tables, bandwidth_gb_s={k: v / 1e9 for k, v in bandwidth.items()})


if __name__ == "__main__":
    main()
