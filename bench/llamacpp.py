"""CPU decode against llama.cpp, side by side on the same weights (issue #19).

    python bench/llamacpp.py                          # Qwen-1.8B shape, random weights (10-20 minutes on 2 cores)
    python bench/llamacpp.py --shape tiny             # a quick self-check of the whole pipeline
    python bench/llamacpp.py --formats bf16,int4 --rounds 3 --threads 2

llama.cpp is what someone decoding on a CPU would pick instead of this package, so its speed is the bar. One
set of random weights is written once as an original Qwen folder (``qwen.tiny``'s writer at the chosen shape);
``qwen.export`` turns that folder into GGUF files (BF16, Q8_0), ``llama-quantize`` makes Q4_0 from the BF16 one,
and our loader reads the same folder: bf16 (qwen's AVX-512 BF16 kernel), int8 (``--int8``, a bf16 scale per
32 weights, as Q8_0) and int4 (``--int4``, a bf16 scale per 32 weights, as Q4_0; lm_head int8). The pairs
compared are bf16 / BF16, int8 / Q8_0 and int4 / Q4_0 (llama.cpp's Q4_0 file keeps its output matrix in Q6_K).

What is measured, the same way on both sides where the tools allow:

* decode b1 and b8: new tokens per second after a 32-token prompt in each of 1 or 8 sequences, prompt
  processing excluded (llama.cpp: ``llama-batched-bench -npp 32 -ntg 32 -npl 1,8``; ours: the engine, extra
  tokens over extra time as in ``bench/generate.py``);
* prompt 512: a 512-token prompt processed per second (llama.cpp: ``llama-bench -p 512``; ours: a 512-token
  prefill through the engine, first token included);
* quality: KL divergence of each quantized format's next-token distribution from its own side's bf16 one, and
  how often their top tokens agree, over the same tokens (``--kl-tokens`` of this package's source text, in
  chunks of ``--kl-ctx``, each chunk's second half scored). llama.cpp: ``llama-perplexity
  --kl-divergence-base`` on the BF16 file, then ``--kl-divergence`` on Q8_0 and Q4_0 (its Q8_0/Q4_0 dot products
  quantize the activations in blocks of 32 in every batch, so this is its decoding precision); ours: the same
  tokens, read back from llama.cpp's file, fed one at a time through the KV cache, so every layer runs its
  decode kernel.

llama.cpp runs as separate processes (a static build of its tools, made once into ``~/.cache/qwen-llamacpp``,
see ``bench/llamacpp_build.py``); ours run in this process. The two sides take turns, format by format, for
``--rounds`` rounds (the order flips every round), and every figure keeps its best, so a slow spell of this
shared machine hits both sides instead of one side's whole row. Without cmake and a compiler, or without the
network to fetch the llama-cpp-python sdist, the bench says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import llamacpp_build  # bench/llamacpp_build.py (the script's folder is on sys.path)
import torch
from generate import engine_runner, measure, nbytes  # bench/generate.py
from machine import amx_settings, cpu_name  # bench/machine.py
from quant import decode_logprobs  # bench/quant.py
from results import add_json_arg, save

import qwen  # noqa: F401  (registers the Qwen classes with transformers' Auto*)
from qwen.engine import Engine
from qwen.export import ExportError, export_gguf
from qwen.quantization import cast_unquantized_, quantize_int4_, quantize_int8_
from qwen.tiny import make_tiny_checkpoint, original_config, weight_shapes
from qwen.tokenizer import QWenTokenizer

PROMPT = 32  # tokens per sequence before the decode measurements
NEW_TOKENS = 32  # decoded tokens per sequence
PREFILL = 512  # the prompt-processing measurement
SHAPES = {  # qwen.tiny's arguments; 1.8b is Qwen-1.8B's shape
    "1.8b": dict(layers=24, hidden=2048, heads=16, intermediate=11008),
    "tiny": dict(layers=2, hidden=64, heads=4, intermediate=128),
}
FORMATS = ("bf16", "int8", "int4")  # ours; llama.cpp's counterparts below
LLAMA_TYPE = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}
OUR_LABEL = {"bf16": "bf16", "int8": "int8 (`--int8`)", "int4": "int4 (`--int4`)"}
FIGURES = ("decode b1 tok/s", "decode b8 tok/s", "prompt 512 tok/s")
QUALITY = ("KL vs its bf16", "top-1 = its bf16")


@dataclass
class Row:
    """One runner at one precision: its weight bytes and the best of each figure over the rounds."""

    runner: str
    format: str
    gb: float = math.nan
    figures: dict[str, float] | None = None
    quality: dict[str, float] | None = None  # QUALITY's values; None where not measured (the bf16 rows)

    def keep_best(self, new: dict[str, float]) -> None:
        """Keep each figure's best over the rounds (a NaN, from a round spoiled by a slow spell, never wins)."""
        self.figures = self.figures or {}
        for key, value in new.items():
            old = self.figures.get(key, math.nan)
            self.figures[key] = value if math.isnan(old) or value > old else old


def log(message: str) -> None:
    """Progress on stderr, so that minutes of work do not look like a hang and stdout keeps the table."""
    print(message, file=sys.stderr, flush=True)


def parameter_count(shape: str) -> int:
    config = original_config(vocab=151936, seq_length=8192, **SHAPES[shape])
    return sum(math.prod(s) for s in weight_shapes(config).values())


def check_resources(folder: Path, params: int, formats: list[str]) -> None:
    """Stop early, with the numbers, when the disk cannot hold the folder and the GGUF files; warn when memory
    looks short (our models stay loaded while llama.cpp maps its file)."""
    per_param = 2.0 + 2.0 + 1.07 * ("int8" in formats) + 0.6 * ("int4" in formats)  # folder, BF16, Q8_0, Q4_0
    need = int(params * per_param * 1.05) + 2**28
    free = shutil.disk_usage(folder).free
    if free < need:
        sys.exit(f"not enough disk space in {folder}: the weights folder and GGUF files need about {need / 1e9:.1f} "
                 f"GB, {free / 1e9:.1f} GB are free (set TMPDIR to a folder on a bigger disk)")
    log(f"disk: about {need / 1e9:.1f} GB needed in {folder}, {free / 1e9:.1f} GB free")
    ram = {"bf16": 2.0, "int8": 1.1, "int4": 0.7}
    want = params * (sum(ram[f] for f in formats) + 2.0)
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return
    if available < want:
        log(f"warning: about {want / 1e9:.1f} GB of memory wanted, {available / 1e9:.1f} GB available: "
            f"expect swapping or an out-of-memory kill; try fewer --formats")


def run_tool(cmd: list[str], timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run a llama.cpp tool; its failure is an error that shows the end of its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def llama_cpp_round(gguf: Path, threads: int) -> tuple[dict[str, float], dict]:
    """One round of llama.cpp's figures for one file, and llama-bench's record (model size, build)."""
    done = run_tool([str(llamacpp_build.tool_path("llama-batched-bench")), "-m", str(gguf), "-t", str(threads),
                     "-tb", str(threads), "-c", "2048", "-npp", str(PROMPT), "-ntg", str(NEW_TOKENS),
                     "-npl", "1,8", "--output-format", "jsonl"])
    out = done.stdout + "\n" + done.stderr
    batched = [json.loads(line) for line in out.splitlines() if line.startswith('{"n_kv_max"')]
    decode = {f"decode b{r['pl']} tok/s": float(r["speed_tg"]) for r in batched}
    if set(decode) != {"decode b1 tok/s", "decode b8 tok/s"}:
        raise RuntimeError(f"llama-batched-bench printed no results for batches 1 and 8:\n{out[-3000:]}")
    done = run_tool([str(llamacpp_build.tool_path("llama-bench")), "-m", str(gguf), "-t", str(threads),
                     "-p", str(PREFILL), "-n", "0", "-r", "1", "-o", "json"])
    record = json.loads(done.stdout)[0]  # -o json: stdout holds only the JSON array
    return {**decode, "prompt 512 tok/s": max(float(ts) for ts in record["samples_ts"])}, record


def our_round(engine: Engine) -> dict[str, float]:
    """One round of our figures for one engine (generate.measure: decode b1/b8 and a 512-token prefill)."""
    row = measure(engine_runner(engine), torch.device("cpu"), PROMPT, PREFILL, NEW_TOKENS, memory=False)
    return {"decode b1 tok/s": row["decode b1 tok/s"], "decode b8 tok/s": row["decode b8 tok/s"],
            "prompt 512 tok/s": row["prefill tok/s"]}


def load_ours(folder: Path, fmt: str, activations: str = "bf16") -> torch.nn.Module:
    """Our model from the original folder, as a user loads it; int8/int4 as ``--int8``/``--int4`` make them, and
    with fp32 activations as ``--dtype float32`` does (the quantized layers from the bf16 weights, the rest cast)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the log above says what is loading; bars would clutter it
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    if fmt == "int8":
        quantize_int8_(model)
    elif fmt == "int4":
        quantize_int4_(model)
    return cast_unquantized_(model, torch.float32) if activations == "fp32" else model


def make_gguf_files(folder: Path, work: Path, formats: list[str], threads: int) -> dict[str, Path]:
    """The GGUF file for each format: BF16 and Q8_0 from qwen.export, Q4_0 by llama-quantize from the BF16."""
    files = {}
    bf16 = work / "model-BF16.gguf"
    for fmt in formats:
        path = work / f"model-{LLAMA_TYPE[fmt]}.gguf"
        start = time.perf_counter()
        if fmt == "int4":
            if not bf16.exists():
                export_gguf(folder, bf16, outtype="bf16")
            run_tool([str(llamacpp_build.tool_path("llama-quantize")), str(bf16), str(path), "Q4_0", str(threads)])
        elif not path.exists():
            export_gguf(folder, path, outtype="bf16" if fmt == "bf16" else "q8_0")
        log(f"  {path.name}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
        files[fmt] = path
    if "bf16" not in formats and bf16.exists():
        bf16.unlink()  # only the source of Q4_0
    return files


def llama_cpp_quality(files: dict[str, Path], work: Path, args: argparse.Namespace) -> tuple[dict, list, str]:
    """llama.cpp's KL and top-1 agreement of Q8_0 and Q4_0 against its BF16, the evaluated tokens (chunks of
    ``--kl-ctx``, read back from llama-perplexity's file) and its system_info line."""
    text = work / "kl-text.txt"
    sources = sorted((Path(__file__).resolve().parents[1] / "qwen").glob("*.py"))
    text.write_text("\n".join(f.read_text() for f in sources))
    base = work / "bf16-logits.kld"
    tool = str(llamacpp_build.tool_path("llama-perplexity"))
    common = ["-c", str(args.kl_ctx), "-b", str(args.kl_ctx), "-t", str(args.threads), "-tb", str(args.threads)]
    done = run_tool([tool, "-m", str(files["bf16"]), "-f", str(text), "--chunks", str(args.kl_tokens // args.kl_ctx),
                     "--kl-divergence-base", str(base), *common])
    system_info = next((line.split("system_info:", 1)[1].strip() for line in done.stderr.splitlines()
                        if "system_info:" in line), "?")
    with base.open("rb") as f:
        header = f.read(20)  # "_logits_", n_ctx, n_vocab, n_chunk
        n_ctx, _, n_chunk = (int.from_bytes(header[i : i + 4], "little", signed=True) for i in (8, 12, 16))
        tokens = torch.frombuffer(bytearray(f.read(4 * n_ctx * n_chunk)), dtype=torch.int32).view(n_chunk, n_ctx)
    quality = {}
    for fmt in ("int8", "int4"):
        if fmt in files:
            done = run_tool([tool, "-m", str(files[fmt]), "--kl-divergence-base", str(base), "--kl-divergence",
                             *common])
            quality[fmt] = parse_kl(done.stdout + "\n" + done.stderr)
    return quality, tokens.tolist(), system_info


def parse_kl(output: str) -> dict[str, float]:
    """Mean KLD and "Same top p" from llama-perplexity --kl-divergence's report."""
    values = {}
    for line in output.splitlines():
        if line.startswith("Mean    KLD:"):
            values[QUALITY[0]] = float(line.split(":", 1)[1].split()[0])
        elif line.startswith("Same top p:"):
            values[QUALITY[1]] = float(line.split(":", 1)[1].split()[0]) / 100
    if len(values) != 2:
        raise RuntimeError(f"llama-perplexity printed no KL statistics:\n{output[-3000:]}")
    return values


def chunk_logprobs(model: torch.nn.Module, chunks: list[list[int]]) -> torch.Tensor:
    """Each chunk's second half scored, as llama-perplexity does, through our decode path."""
    return torch.cat([decode_logprobs(model, chunk, len(chunk) // 2) for chunk in chunks])


def our_quality(logprobs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    kl = torch.nn.functional.kl_div(logprobs, reference, log_target=True, reduction="batchmean").item()
    return {QUALITY[0]: kl, QUALITY[1]: (logprobs.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def fmt_value(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def print_table(rows: list[tuple[Row, Row]]) -> None:
    """One markdown table: llama.cpp's row, ours, and ours / llama.cpp, per precision (for KL, lower is better)."""
    cols = ["runner", "format", "GB", *FIGURES, *QUALITY]
    print("| " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(cols) - 2))
    for theirs, ours in rows:
        for row in (theirs, ours):
            quality = [f"{row.quality[QUALITY[0]]:.4g}", f"{100 * row.quality[QUALITY[1]]:.1f}%"] if row.quality \
                else ["(reference)"] * 2
            cells = [row.runner, row.format, f"{row.gb:.2f}", *(fmt_value(row.figures[f]) for f in FIGURES), *quality]
            print("| " + " | ".join(cells) + " |")
        ratios = [f"{ours.gb / theirs.gb:.2f}x", *(f"**{ours.figures[f] / theirs.figures[f]:.2f}x**" for f in FIGURES)]
        if ours.quality and theirs.quality:
            ratios += [f"{ours.quality[QUALITY[0]] / theirs.quality[QUALITY[0]]:.2f}x",
                       f"{100 * (ours.quality[QUALITY[1]] - theirs.quality[QUALITY[1]]):+.1f} points"]
        else:
            ratios += ["", ""]
        cells = ["**ours / llama.cpp**", f"{ours.format.split(' ')[0].rstrip(',')} / {theirs.format}", *ratios]
        print("| " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="1.8b",
                        help="1.8b: Qwen-1.8B's shape (default); tiny: a quick self-check")
    parser.add_argument("--rounds", type=int, default=2, help="turns each side takes; the best figure is reported")
    parser.add_argument("--threads", type=int, default=2, help="threads for llama.cpp and for PyTorch")
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated subset of bf16,int8,int4 (paired with BF16, Q8_0, Q4_0); the quality "
                             "columns need bf16, their reference")
    parser.add_argument("--kl-ctx", type=int, default=256, help="tokens per chunk of the quality measurement")
    parser.add_argument("--kl-tokens", type=int, default=512, help="tokens the quality measurement evaluates")
    parser.add_argument("--activations", choices=["bf16", "fp32"], default="bf16",
                        help="our activations' dtype: bf16 (what --dtype auto loads) or fp32 (--dtype float32, as "
                             "llama.cpp computes; the bf16 row, the quality reference, then runs in fp32 too)")
    add_json_arg(parser)
    args = parser.parse_args()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        parser.error(f"--formats takes a comma-separated subset of {','.join(FORMATS)}, not {args.formats!r}")
    formats = [f for f in FORMATS if f in formats]
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")

    if llamacpp_build.build_or_exit(llamacpp_build.TOOLS, announce=log) is None:
        return

    torch.set_num_threads(args.threads)
    params = parameter_count(args.shape)
    with tempfile.TemporaryDirectory(prefix="qwen-vs-llamacpp-") as tmp:
        work = Path(tmp)
        check_resources(work, params, formats)
        log(f"writing random {args.shape}-shape weights ({params / 1e9:.2f} B parameters, bf16) as an original "
            f"Qwen folder")
        t = time.perf_counter()
        folder = make_tiny_checkpoint(work / f"qwen-{args.shape}", dtype=torch.bfloat16,
                                      shards=4 if args.shape == "1.8b" else 1, **SHAPES[args.shape])
        log(f"  done in {time.perf_counter() - t:.0f} s; GGUF files:")
        try:
            files = make_gguf_files(folder, work, formats, args.threads)
        except ExportError as exc:
            sys.exit(f"error: {exc}")

        tokenizer = QWenTokenizer()
        engines, rows = {}, {}
        for fmt in formats:
            t = time.perf_counter()
            model = load_ours(folder, fmt, args.activations)
            engines[fmt] = Engine(model, tokenizer, max_batch_size=8, max_model_len=PREFILL + NEW_TOKENS + 8,
                                  prefix_cache_bytes=0)  # rounds repeat one prompt: measure its prefill
            label = OUR_LABEL[fmt] + (", fp32 activations" if args.activations == "fp32" else "")
            rows[fmt] = (Row("llama.cpp", LLAMA_TYPE[fmt]), Row("qwen engine", label, nbytes(model) / 1e9))
            log(f"loaded ours, {fmt}: {rows[fmt][1].gb:.2f} GB in {time.perf_counter() - t:.1f} s")

        system_info = "?"
        if "bf16" in formats and len(formats) > 1:
            log(f"quality: llama-perplexity's KL divergence over {args.kl_tokens} tokens, then ours on the same tokens")
            t = time.perf_counter()
            quality, chunks, system_info = llama_cpp_quality(files, work, args)
            reference = chunk_logprobs(engines["bf16"].model, chunks)
            for fmt in formats[1:]:
                rows[fmt][0].quality = quality[fmt]
                rows[fmt][1].quality = our_quality(chunk_logprobs(engines[fmt].model, chunks), reference)
                log(f"  {fmt}: ours KL {rows[fmt][1].quality[QUALITY[0]]:.4f}, llama.cpp's "
                    f"{rows[fmt][0].quality[QUALITY[0]]:.4f}")
            log(f"  done in {time.perf_counter() - t:.0f} s")

        record = {}
        for round_ in range(args.rounds):
            for fmt in formats:
                theirs, ours = rows[fmt]
                sides = ["llama.cpp", "qwen"] if round_ % 2 == 0 else ["qwen", "llama.cpp"]
                for side in sides:
                    t = time.perf_counter()
                    if side == "llama.cpp":
                        figures, record = llama_cpp_round(files[fmt], args.threads)
                        theirs.gb = record["model_size"] / 1e9
                        theirs.keep_best(figures)
                    else:
                        figures = our_round(engines[fmt])
                        ours.keep_best(figures)
                    shown = ", ".join(f"{k.removesuffix(' tok/s')} {fmt_value(v)}" for k, v in figures.items())
                    log(f"[round {round_ + 1}/{args.rounds}] {side} {fmt}: {shown} tok/s "
                        f"({time.perf_counter() - t:.0f} s)")

    build_info = f"build {record.get('build_number', '?')}, commit {record.get('build_commit', '?')}"
    print(f"\n### {args.shape} shape, random weights, {args.threads} threads, best of {args.rounds} rounds\n")
    print(f"{cpu_name()} ({amx_settings()}); torch {torch.__version__}; llama.cpp from llama-cpp-python "
          f"{llamacpp_build.VERSION} ({build_info}; system_info: {system_info}). Both sides map their weight "
          f"files (llama.cpp's default mmap; our safetensors loads; --int8/--int4 then hold their own copies). "
          f"Decode: {NEW_TOKENS} new tokens per sequence after a {PROMPT}-token prompt; prompt: {PREFILL} tokens. "
          f"GB: bytes of weights (1e9), embedding included. Quality: KL divergence from the same side's bf16 and "
          f"top-1 agreement, over {args.kl_tokens} tokens in chunks of {args.kl_ctx} (second halves scored), ours "
          f"through the decode path. Activations: llama.cpp fp32; ours {args.activations}.\n")
    print_table([rows[fmt] for fmt in formats])
    save(args.json, "llamacpp", {"formats": [
        {"format": fmt, "runner": row.runner, "label": row.format, "GB": row.gb, **(row.figures or {}),
         **(row.quality or {})} for fmt in formats for row in rows[fmt]]},
        shape=args.shape, threads=args.threads, activations=args.activations, llama_cpp=build_info,
        system_info=system_info, amx=amx_settings())


if __name__ == "__main__":
    main()
