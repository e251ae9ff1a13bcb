"""A long chat through two servers on the same weights: ``openai_api.py`` against llama.cpp's llama-server.

    python bench/chat_ttft.py                  # Qwen-1.8B shape, random bf16 weights (~15 min the first time)
    python bench/chat_ttft.py --shape tiny     # a quick self-check of the whole pipeline
    python bench/chat_ttft.py --no-amx         # ours without AMX too, as llama.cpp is built here

What a chat user feels is the wait before each reply starts, and in a long chat it grows with the history
unless the server keeps the conversation's keys and values. Both servers keep them: ours with its prefix
cache, llama-server with its slot's prompt cache (``cache_prompt``, on by default). One set of random weights
is written as an original Qwen folder; ours serves that folder in bf16 (``--dtype bfloat16``), llama-server a
BF16 GGUF exported from it (``qwen.export``), with ``--chat-template chatml``, one slot, the same threads.

A chat of ``--turns`` turns: each user message is ~250 tokens of plain text, the history replays a fixed
assistant reply (as a chat client sends the text back), and each reply streams 16 greedy tokens. Time to first
token is from sending the request to the first chunk that carries text, measured with the openai client on
both; the two servers take turns within each turn (the order flips every turn). llama-server is built once
from the llama-cpp-python sdist (``bench/llamacpp_build.py``); without cmake and a compiler, or without the
network to fetch the sdist, the bench says so and exits 0.

On CPUs with AMX our prefills run oneDNN's AMX kernels; llama.cpp is built here without AMX (see
``bench/llamacpp_build.py``; its AMX code covers quantized types, not BF16, anyway). ``--no-amx`` caps oneDNN at
AVX-512 BF16 in our server (``ONEDNN_MAX_CPU_ISA``), so both sides use the same instructions.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import llamacpp_build  # bench/llamacpp_build.py (the script's folder is on sys.path)
import openai
import torch
from llamacpp import SHAPES, log  # bench/llamacpp.py
from machine import cpu_name  # bench/machine.py
from prefix_cache import text  # bench/prefix_cache.py

from qwen.export import export_gguf
from qwen.serve.process import ServerProcess, free_port, wait_until_ok
from qwen.tiny import make_tiny_checkpoint
from qwen.tokenizer import QWenTokenizer

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful assistant."


def first_token_seconds(client: openai.OpenAI, messages: list[dict], new_tokens: int) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(model="bench", messages=messages, max_tokens=new_tokens,
                                            temperature=0, stream=True)
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("the reply carried no text")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="1.8b")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--message-tokens", type=int, default=250)
    parser.add_argument("--threads", type=int, default=2, help="threads for both servers")
    parser.add_argument("--no-amx", action="store_true", help="our server without AMX (oneDNN up to AVX-512 BF16)")
    args = parser.parse_args()

    started = time.perf_counter()
    if args.no_amx:
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"  # read by our server (a child process) at start
    amx = "amx_tile" in Path("/proc/cpuinfo").read_text() and not args.no_amx
    build = llamacpp_build.build_or_exit(["llama-server"], announce=log)
    if build is None:
        return
    tokenizer = QWenTokenizer()
    reply = text(60, seed=99, tokenizer=tokenizer)
    queries = [text(args.message_tokens, seed=turn, tokenizer=tokenizer) for turn in range(args.turns)]

    with tempfile.TemporaryDirectory(prefix="qwen-chat-ttft-") as tmp:
        work = Path(tmp)
        log(f"writing random {args.shape}-shape weights as an original Qwen folder and a BF16 GGUF")
        folder = make_tiny_checkpoint(work / f"qwen-{args.shape}", dtype=torch.bfloat16, **SHAPES[args.shape])
        gguf = export_gguf(folder, work / "model-BF16.gguf", outtype="bf16").path
        port = free_port()
        llama_log = (work / "llama-server.log").open("w")
        llama = subprocess.Popen([str(build / "bin" / "llama-server"), "-m", str(gguf), "-t", str(args.threads),
                                  "-tb", str(args.threads), "--port", str(port), "--host", "127.0.0.1", "-c", "8192",
                                  "--chat-template", "chatml", "-np", "1", "--alias", "bench"],
                                 stdout=llama_log, stderr=subprocess.STDOUT)
        ours = ServerProcess(folder, "--model-name", "bench", "--dtype", "bfloat16", "--threads", str(args.threads),
                             "--max-model-len", "8192", command=[sys.executable, str(ROOT / "openai_api.py")], cwd=ROOT)
        try:
            wait_until_ok(f"http://127.0.0.1:{port}/health", 600, llama, work / "llama-server.log")
            ours.wait(600)
            clients = {"llama-server": openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x"),
                       "qwen (openai_api.py)": openai.OpenAI(base_url=f"{ours.url}/v1", api_key="x")}
            for client in clients.values():  # warm-up: first-request costs stay out of turn 1
                first_token_seconds(client, [{"role": "user", "content": "hello"}], 2)
            seconds: dict[str, list[float]] = {name: [] for name in clients}
            history: list[dict] = [{"role": "system", "content": SYSTEM}]
            for turn, query in enumerate(queries):
                history.append({"role": "user", "content": query})
                order = list(clients) if turn % 2 == 0 else list(clients)[::-1]
                for name in order:
                    seconds[name].append(first_token_seconds(clients[name], history, 16))
                log(f"turn {turn + 1}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in seconds.items()))
                history.append({"role": "assistant", "content": reply})
        finally:
            ours.stop()
            llama.terminate()
            llama.wait(30)
            llama_log.close()

    prompt_tokens = len(tokenizer.encode("".join(m["content"] for m in history)))
    print(f"\nLong chat, {args.turns} turns of ~{args.message_tokens}-token messages (~{prompt_tokens} tokens of "
          f"history at the end), 16 greedy tokens a reply; Qwen-{args.shape} shape, random bf16 weights, "
          f"{args.threads} threads each, {cpu_name()} (ours {'with' if amx else 'without'} AMX, llama.cpp without), "
          f"load average {os.getloadavg()[0]:.1f}; llama.cpp from the "
          f"llama-cpp-python {llamacpp_build.VERSION} sdist; {time.perf_counter() - started:.0f} s in all.\n")
    print("Time to first token per turn (s):\n")
    print("| server | " + " | ".join(f"turn {i + 1}" for i in range(args.turns)) + " |")
    print("|---|" + "---:|" * args.turns)
    for name, values in seconds.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    ours_last, theirs_last = seconds["qwen (openai_api.py)"][-1], seconds["llama-server"][-1]
    print(f"\nLast turn: ours {ours_last:.2f} s, llama-server {theirs_last:.2f} s ({theirs_last / ours_last:.2f}x).")


if __name__ == "__main__":
    main()
