"""Speculative decoding through two servers on the same weights: ``openai_api.py`` against llama.cpp's llama-server.

    python bench/speculative_llamacpp.py                 # Qwen-1.8B shape, random bf16 weights
    python bench/speculative_llamacpp.py --shape tiny    # a quick check of the machinery

Each server runs three ways, one at a time: plain; prompt lookup (ours ``--speculative ngram``, llama-server's
``--spec-type ngram-simple``); a draft model made of the same weights in 4 bits (ours ``--draft-model`` on the
folder with ``--draft-quant int4``, llama-server ``-md`` on the GGUF made Q4_0 by ``llama-quantize``). Both guess
up to 4 tokens (``--num-speculative-tokens 4``, ``--spec-draft-n-max 4``). The requests are the ones
``bench/speculative.py`` uses: a prompt of token ids that holds every pair of an alphabet of A tokens, a logit
bias that makes those tokens the likely ones (A = 1: one token over and over, every guess right; A = 2: sampled,
about half). The figure is decode tokens/s seen by a streaming client (tokens after the first over the time after
the first), the median of ``--rounds`` requests; "vs plain" compares each server with its own plain run.
llama-server is built once from the llama-cpp-python sdist (``bench/llamacpp_build.py``), without AMX.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import llamacpp_build  # bench/llamacpp_build.py (the script's folder is on sys.path)
import torch
from llamacpp import SHAPES, log, run_tool  # bench/llamacpp.py
from machine import cpu_name  # bench/machine.py
from results import add_json_arg, save
from speculative import alphabet_prompt  # bench/speculative.py

from qwen.export import export_gguf
from qwen.serve.process import ServerProcess, free_port, wait_until_ok
from qwen.tiny import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
GUESS = 4
WAYS = ("plain", "prompt lookup", "int4 draft")


def decode_rate(url: str, prompt: list[int], bias: dict[int, float], new_tokens: int, sample: bool,
                seed: int) -> float:
    """Streamed /v1/completions: tokens after the first over the time after the first."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "stream": True, "seed": seed,
            "temperature": 1.0 if sample else 0.0, "logit_bias": {str(t): b for t, b in bias.items()}}
    times = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            data = line[5:].strip() if line.startswith("data:") else ""
            if data and data != "[DONE]" and any(c.get("text") for c in json.loads(data).get("choices", [])):
                times.append(time.perf_counter())
    if len(times) < 2:
        raise RuntimeError(f"{url} streamed {len(times)} pieces of text")
    return (new_tokens - 1) / (times[-1] - times[0])


def measure(url: str, alphabets: list[int], new_tokens: int, rounds: int) -> dict[int, float]:
    rates = {}
    for size in alphabets:
        letters, prompt = alphabet_prompt(size, 300, seed=size)
        bias = {t: 40.0 for t in letters}
        decode_rate(url, prompt, bias, 4, size > 1, seed=0)  # warm
        rates[size] = statistics.median(decode_rate(url, prompt, bias, new_tokens, size > 1, seed=r)
                                        for r in range(rounds))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="1.8b")
    parser.add_argument("--threads", type=int, default=2, help="threads for both servers")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--alphabets", default="1,2", help="alphabet sizes A: acceptance about 1/A")
    parser.add_argument("--ways", default=",".join(WAYS),
                        help="which ways to run, comma-separated (plain is each server's reference)")
    add_json_arg(parser)
    args = parser.parse_args()
    alphabets = [int(a) for a in args.alphabets.split(",")]
    ways = ["plain", *(w for w in args.ways.split(",") if w != "plain")]
    if unknown := set(ways) - set(WAYS):
        sys.exit(f"unknown --ways {', '.join(sorted(unknown))}; choose from {', '.join(WAYS)}")
    started = time.perf_counter()
    build = llamacpp_build.build_or_exit(["llama-server", "llama-quantize"], announce=log)
    if build is None:
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="qwen-spec-") as tmp:
        work = Path(tmp)
        log(f"writing random {args.shape}-shape weights as an original Qwen folder, a BF16 and a Q4_0 GGUF")
        folder = make_tiny_checkpoint(work / f"qwen-{args.shape}", dtype=torch.bfloat16, **SHAPES[args.shape])
        gguf = export_gguf(folder, work / "model-BF16.gguf", outtype="bf16").path
        q4 = work / "model-Q4_0.gguf"
        run_tool([str(build / "bin" / "llama-quantize"), str(gguf), str(q4), "Q4_0", str(args.threads)])
        threads = ["-t", str(args.threads), "-tb", str(args.threads)]
        llama_ways = {"plain": [], "prompt lookup": ["--spec-type", "ngram-simple", "--spec-draft-n-max", str(GUESS)],
                      "int4 draft": ["-md", str(q4), "--spec-draft-n-max", str(GUESS), "-td", str(args.threads)]}
        ours_ways = {"plain": [], "prompt lookup": ["--speculative", "ngram"],
                     "int4 draft": ["--draft-model", str(folder), "--draft-quant", "int4"]}
        llama_ways = {w: llama_ways[w] for w in ways}
        ours_ways = {w: ours_ways[w] for w in ways}
        for way, extra in llama_ways.items():
            port = free_port()
            log_path = work / "llama-server.log"
            with log_path.open("w") as out:
                server = subprocess.Popen([str(build / "bin" / "llama-server"), "-m", str(gguf), *threads, *extra,
                                           "--port", str(port), "--host", "127.0.0.1", "-c", "4096", "-np", "1",
                                           "--chat-template", "chatml", "--alias", "bench"],
                                          stdout=out, stderr=subprocess.STDOUT)
                try:
                    wait_until_ok(f"http://127.0.0.1:{port}/health", 600, server, log_path)
                    rates = measure(f"http://127.0.0.1:{port}", alphabets, args.new_tokens, args.rounds)
                finally:
                    server.terminate()
                    server.wait(30)
            rows += [{"server": "llama-server", "way": way, "alphabet": a, "tok/s": r} for a, r in rates.items()]
            log(f"llama-server {way}: {rates}")
        for way, extra in ours_ways.items():
            with ServerProcess(folder, "--model-name", "bench", "--dtype", "bfloat16", "--threads", str(args.threads),
                               "--max-model-len", "4096", "--num-speculative-tokens", str(GUESS), *extra,
                               command=[sys.executable, str(ROOT / "openai_api.py")], cwd=ROOT) as server:
                server.wait(600)
                rates = measure(server.url, alphabets, args.new_tokens, args.rounds)
            rows += [{"server": "qwen (openai_api.py)", "way": way, "alphabet": a, "tok/s": r}
                     for a, r in rates.items()]
            log(f"ours {way}: {rates}")
    for row in rows:
        plain = next(r for r in rows if r["server"] == row["server"] and r["way"] == "plain"
                     and r["alphabet"] == row["alphabet"])
        row["vs plain"] = row["tok/s"] / plain["tok/s"]
        theirs = next(r for r in rows if r["server"] == "llama-server" and r["way"] == row["way"]
                      and r["alphabet"] == row["alphabet"])
        row["vs llama-server"] = row["tok/s"] / theirs["tok/s"]

    print(f"\nSpeculative decoding through the servers, {args.new_tokens} tokens a request; Qwen-{args.shape} shape, "
          f"random bf16 weights, {args.threads} threads each, {cpu_name()} (llama.cpp without AMX), load average "
          f"{os.getloadavg()[0]:.1f}; llama.cpp from the llama-cpp-python {llamacpp_build.VERSION} sdist; median "
          f"of {args.rounds} requests; {time.perf_counter() - started:.0f} s in all.\n")
    cols = ["server", "way", "alphabet", "tok/s", "vs plain", "vs llama-server"]
    print("| " + " | ".join(cols) + " |")
    print("|---|---|" + "---:|" * (len(cols) - 2))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    save(args.json, "speculative_llamacpp", {"servers": rows}, shape=args.shape, threads=args.threads)


if __name__ == "__main__":
    main()
