"""Quantization options side by side: size, memory, decode speed and quality on one random model.

    python bench/quant.py                           # hidden 512, 4 layers (~3 min on 2 idle cores)
    python bench/quant.py --hidden 1024 --layers 8  # blocks a larger share of the weights (~10 min)
    python bench/quant.py --rows int8,int4          # these rows and fp32, the reference (see --help)

Rows: fp32; bf16; int8 weight-only (round-to-nearest in blocks of 32 with a bf16 scale each, every Linear incl.
lm_head, ``quantize_int8_``: Q8_0's format on an AVX-512 CPU); int4 weight-only (``quantize_int4_``: 4-bit
blocks of 32, Q4_0's format, with the lm_head int8 as ``--int4`` does on an AVX-512 CPU, or kept in bf16;
asymmetric groups of 128, GPTQ's layout, as on AVX2-only CPUs); GPTQ int8
and int4 folders written by run_gptq's code (qwen.quantization.gptq_quantizer) and loaded with the
``dequant`` backend (bf16 weights), the ``int8`` backend (Int8Linear blocks, lm_head bf16 as stored)
and, for int4, the ``int4`` backend (Int4Linear blocks). Each row runs in a fresh child process so
its peak memory is its own: "peak RSS" is the highest resident memory (sampled from /proc/self/statm
every 2 ms) above the child's baseline after imports, over loading, a held-out forward and a short
generation. Decode tokens/s is greedy, batch 1, ``model.generate``, measured as extra tokens over
extra time (1 + N tokens minus 1 token, same prompt), with every row loaded in one process and timed
in turn over a few rounds (best kept), so a busy machine slows all rows alike. Quality is measured on
the path that decodes: the held-out text is fed one token at a time through the KV cache (teacher-forced),
so every layer runs its decode kernel (int8 and int4 quantize the activations there), and each position's
next-token distribution is compared with the fp32 model's: KL divergence and top-1 agreement. (The model is
random, so perplexity would mean nothing.) A second table gives the KV cache per token with and without the int8 cache
(``use_cache_quantization``), a third the sizes the same formats take for the released shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # bench/machine.py (the script's folder is on sys.path)
from peak_rss import PeakRSS  # bench/peak_rss.py

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    # key: (label, folder, dtype, gptq_backend, weight-only quantization afterwards)
    "fp32": ("fp32", "fp32", "float32", None, None),
    "bf16": ("bf16", "bf16", "bfloat16", None, None),
    "int8": ("int8 weight-only (RTN, blocks of 32: `--int8`)", "bf16", "bfloat16", None, "int8"),
    "int4": ("int4 weight-only (RTN, blocks of 32, int8 lm_head: `--int4`)", "bf16", "bfloat16", None, "int4"),
    "int4-keep": ("int4 weight-only (RTN, blocks of 32, bf16 lm_head)", "bf16", "bfloat16", None, "int4-keep"),
    "int4-g128": ("int4 weight-only (RTN, asymmetric groups of 128, int8 lm_head: AVX2 CPUs)", "bf16", "bfloat16",
                  None, "int4-g128"),
    "gptq8": ("GPTQ int8, dequant", "gptq8", "bfloat16", "dequant", None),
    "gptq8-int8": ("GPTQ int8, int8 backend", "gptq8", "bfloat16", "int8", None),
    "gptq4": ("GPTQ int4, dequant", "gptq4", "bfloat16", "dequant", None),
    "gptq4-int8": ("GPTQ int4, int8 backend", "gptq4", "bfloat16", "int8", None),
    "gptq4-int4": ("GPTQ int4, int4 backend", "gptq4", "bfloat16", "int4", None),
}


TABLE_HEADER = ("| format | on disk | weights in RAM | peak RSS | decode tok/s | KL vs fp32, decoding | "
                "top-1 = fp32, decoding |")


def row_keys(text: str) -> list[str]:
    """argparse type of --rows: known keys, comma-separated; fp32 (the quality reference) always first."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown row {', '.join(unknown)}: choose from {', '.join(ROWS)}")
    return ["fp32", *(k for k in dict.fromkeys(keys) if k != "fp32")]


def sample_texts(tokenizer, chunk: int) -> tuple[list[list[int]], list[int]]:
    """Calibration chunks and a held-out chunk of real text: this package's own sources and docs."""
    files = sorted((ROOT / "qwen").glob("*.py"))
    ids = [tokenizer.encode(f.read_text()) for f in files]
    held = ids.pop(len(ids) // 2)[:chunk]
    calib = [x[i : i + chunk] for x in ids for i in range(0, len(x) - chunk + 1, chunk)]
    return calib, held


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


# ----- one row, in a child process ----------------------------------------------------------------


def load(work: Path, name: str):
    from transformers import AutoModelForCausalLM

    from qwen.quantize import quantize_int4_, quantize_int8_

    _, folder, dtype, backend, after = ROWS[name]
    kwargs = {"gptq_backend": backend} if backend else {}
    model = AutoModelForCausalLM.from_pretrained(work / folder, dtype=getattr(torch, dtype), **kwargs).eval()
    return {
        "int8": quantize_int8_,
        "int4": quantize_int4_,
        "int4-keep": lambda m: quantize_int4_(m, lm_head="keep"),
        "int4-g128": lambda m: quantize_int4_(m, group_size=128),
        None: lambda m: m,
    }[after](model)


def generate_seconds(model, prompt: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return time.perf_counter() - start


@torch.no_grad()
def decode_logprobs(model, tokens: list[int], first: int = 0) -> torch.Tensor:
    """Next-token log-probabilities at positions ``first`` .. len - 2, one token per forward through the KV cache:
    the path, and the kernels, that generation runs (also bench/llamacpp.py's quality columns)."""
    ids, cache, rows = torch.tensor([tokens]), None, []
    for i in range(len(tokens) - 1):
        out = model(ids[:, i : i + 1], cache=cache, use_cache=True)
        cache = out.cache
        if i >= first:
            rows.append(out.logits[0, -1].float().log_softmax(-1))
    return torch.stack(rows)


def measure(args: argparse.Namespace) -> None:
    """One row in a fresh process: memory (load + held-out forward + a short generation) and quality."""
    import qwen  # noqa: F401

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    held = json.loads((work / "held.json").read_text())
    base = PeakRSS.rss()
    with PeakRSS() as mem:
        start = time.perf_counter()
        model = load(work, args.measure)
        load_s = time.perf_counter() - start
        ram = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        logprobs = decode_logprobs(model, held)
        generate_seconds(model, torch.tensor([held[:32]]), 1 + args.new_tokens)
    ref_path = work / "fp32_logprobs.pt"
    if args.measure == "fp32":
        torch.save(logprobs, ref_path)
    ref = torch.load(ref_path)
    kl = torch.nn.functional.kl_div(logprobs, ref, log_target=True, reduction="batchmean").item()
    top1 = (logprobs.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(json.dumps({"load_s": load_s, "ram": ram, "peak_rss": mem.peak - base, "kl": kl, "top1": top1}))


def decode_speeds(work: Path, rows: list[str], held: list[int], new_tokens: int, rounds: int) -> dict[str, float]:
    """Greedy batch-1 decode tokens/s of the rows, all loaded in this process and timed in turn for
    ``rounds`` rounds (best round kept), so a busy machine slows every row alike."""
    models = {name: load(work, name) for name in rows}
    prompt = torch.tensor([held[:32]])
    for model in models.values():
        generate_seconds(model, prompt, 2)  # warm-up
    best = dict.fromkeys(models, 0.0)
    for _ in range(rounds):
        for name, model in models.items():
            extra = generate_seconds(model, prompt, 1 + new_tokens) - generate_seconds(model, prompt, 1)
            best[name] = max(best[name], new_tokens / extra)
    return best


# ----- the whole run ------------------------------------------------------------------------------


def kv_cache_table(folder: Path, tokens: int) -> list[tuple[str, float]]:
    from transformers import AutoModelForCausalLM

    ids = torch.arange(1000, 1000 + tokens)[None]
    rows = []
    for name, dtype, quantized in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                   ("int8 (use_cache_quantization)", torch.float32, True)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_cache_quantization=quantized).eval()
        with torch.no_grad():
            cache = model(ids, use_cache=True).cache
        if quantized:
            nbytes = cache.nbytes()
        else:
            nbytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        rows.append((name, nbytes / tokens))
        del model, cache
    return rows


def released_sizes() -> list[str]:
    """Bytes of the released shapes in each format, from the weight shapes (no download)."""
    from qwen.tiny import original_config, weight_shapes

    shapes = {"Qwen-1.8B": (24, 2048, 16, 11008), "Qwen-7B": (32, 4096, 32, 22016), "Qwen-14B": (40, 5120, 40, 27392)}
    lines = ["| shape | bf16 | GPTQ int8 | GPTQ int4 | int4 with int8 backend in RAM |", "|---|---|---|---|---|"]
    for name, (layers, hidden, heads, inter) in shapes.items():
        table = weight_shapes(original_config(layers, hidden, heads, inter, 151936, 8192))
        plain = sum(math.prod(s) for k, s in table.items() if not _quantized(k))
        quant = [(s[0], s[1]) for k, s in table.items() if _quantized(k)]  # (out, in)
        bias = sum(math.prod(s) for k, s in table.items() if k.endswith("c_attn.bias"))

        bf16 = 2 * (plain + sum(o * i for o, i in quant) + bias)
        int8_ram = 2 * plain + sum(o * i + 2 * o for o, i in quant) + 2 * bias
        gptq = {bits: 2 * plain + 2 * bias + sum(
            o * i * bits / 8 + math.ceil(i / 128) * o * (2 + bits / 8) + 4 * i for o, i in quant) for bits in (8, 4)}
        lines.append(f"| {name} | {bf16 / 1e9:.2f} GB | {gptq[8] / 1e9:.2f} GB | {gptq[4] / 1e9:.2f} GB | "
                     f"{int8_ram / 1e9:.2f} GB |")
    return lines


def _quantized(key: str) -> bool:
    return key.startswith("transformer.h.") and key.endswith(".weight") and not key.endswith(("ln_1.weight",
                                                                                                "ln_2.weight"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=None, help="both MLP branches (default 5.5 x hidden)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="decode timing rounds over all rows (best kept)")
    parser.add_argument("--samples", type=int, default=16, help="calibration chunks for GPTQ")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per calibration / held-out chunk")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rows", type=row_keys, default=list(ROWS),
                        help=f"comma-separated rows, fp32 (the reference) always among them; default: all of "
                             f"{','.join(ROWS)}")
    parser.add_argument("--measure", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)

    from transformers import AutoTokenizer

    import qwen  # noqa: F401
    from qwen.quantization.gptq_quantizer import quantize_folder
    from qwen.tiny import make_tiny_checkpoint

    intermediate = args.intermediate or int(5.5 * args.hidden) // 256 * 256
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qwen-bench-quant-") as tmp:
        work = Path(tmp)
        shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=intermediate)
        make_tiny_checkpoint(work / "fp32", **shape)
        make_tiny_checkpoint(work / "bf16", dtype=torch.bfloat16, **shape)
        tokenizer = AutoTokenizer.from_pretrained(work / "fp32")
        calib, held = sample_texts(tokenizer, args.chunk)
        calib = calib[: args.samples]
        (work / "held.json").write_text(json.dumps(held))
        quant_s = {}
        for bits in sorted({int(ROWS[k][1][4:]) for k in args.rows if ROWS[k][1].startswith("gptq")}):
            t = time.perf_counter()
            quantize_folder(work / "fp32", calib, work / f"gptq{bits}", bits=bits, group_size=128, device="cpu",
                            progress=False)
            quant_s[bits] = time.perf_counter() - t

        speeds = decode_speeds(work, args.rows, held, args.new_tokens, args.rounds)
        results = {}
        for name in args.rows:
            cmd = [sys.executable, __file__, "--measure", name, "--work", str(work), "--threads", str(args.threads),
                   "--new-tokens", str(args.new_tokens)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1]) | {"tok_s": speeds[name]}
        kv = kv_cache_table(work / "fp32", args.chunk)
        sizes = {name: folder_size(work / ROWS[name][1]) for name in args.rows}

    params_blocks = args.layers * (4 * args.hidden**2 + 3 * args.hidden * intermediate // 2)
    params_embed = 2 * 151936 * args.hidden
    print(f"\nRandom Qwen model: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate "
          f"{intermediate}: {params_blocks / 1e6:.1f}M parameters in the blocks (what GPTQ quantizes), "
          f"{params_embed / 1e6:.1f}M in wte + lm_head. {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}, CPU: {cpu_name()}."
          + "".join(f" GPTQ int{bits} ({len(calib)} x {args.chunk} calibration tokens, group 128): {s:.0f} s (load + "
                    "quantize + write)." for bits, s in quant_s.items()) + "\n")
    print(TABLE_HEADER)
    print("|---" * TABLE_HEADER.count(" | ") + "|---|")
    for name, r in results.items():
        disk = "quantized at load" if ROWS[name][4] else f"{sizes[name] / 2**20:.0f} MiB"
        print(f"| {ROWS[name][0]} | {disk} | {r['ram'] / 2**20:.0f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | "
              f"{r['tok_s']:.1f} | {r['kl']:.4f} | {100 * r['top1']:.1f}% |")
    print(f"\nKV cache per token ({args.layers} layers x {args.heads} heads x head_dim {args.hidden // args.heads}):\n")
    print("| cache | bytes per token | vs fp32 |")
    print("|---|---|---|")
    for name, per_token in kv:
        print(f"| {name} | {per_token:.0f} | {per_token / kv[0][1]:.2f}x |")
    print("\nSizes of the released shapes in each format (computed from the weight shapes; lm_head, wte and "
          "norms stay 16-bit):\n")
    print("\n".join(released_sizes()))
    print(f"\nwhole run: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
