"""Serving throughput: the real ``openai_api.py`` server with continuous batching vs one request at a time.

    python bench/serve.py                      # tiny random checkpoint (made in a temp folder)
    python bench/serve.py -c FOLDER --max-tokens 128 --clients 1,8,32

The server is started twice in this run (subprocesses on 127.0.0.1): ``--max-batch-size 16`` and
``--max-batch-size 1``. For each number of concurrent clients, every client streams chat completions
(greedy, ``max_tokens`` tokens, a different prompt per client) with ``openai.AsyncOpenAI``. Aggregate
tokens/s is the completion tokens reported by the server (``stream_options.include_usage``) over the
wall time of the whole wave; time to first token is from sending a request to its first content chunk.
Each level runs at least ``--min-requests`` requests (clients repeat theirs) so the percentiles of one
client are not a single sample. Prints a markdown table and the batched/unbatched ratio at the most
clients.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai

from qwen.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"
TOPICS = ["rivers", "mountains", "databases", "compilers", "gardens", "trains", "music", "chess", "oceans",
          "bridges", "robots", "coffee", "deserts", "volcanoes", "libraries", "satellites"]


@dataclass
class Level:
    clients: int
    requests: int
    tokens: int
    wall: float
    ttft: list[float]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall

    def ttft_ms(self, q: float) -> float:
        values = sorted(self.ttft)
        return 1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_request(client: openai.AsyncOpenAI, prompt: str, max_tokens: int, extra: dict) -> tuple[int, float]:
    """Stream one chat completion; return (completion tokens, seconds to the first content chunk)."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body=extra,
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - start


async def run_level(url: str, clients: int, rounds: int, max_tokens: int, extra: dict) -> Level:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)

    async def user(i: int) -> list[tuple[int, float]]:
        return [await one_request(client, f"User {i} (round {r}): tell me about {TOPICS[i % len(TOPICS)]}.",
                                  max_tokens, extra) for r in range(rounds)]

    try:
        start = time.perf_counter()
        results = [r for per_user in await asyncio.gather(*(user(i) for i in range(clients))) for r in per_user]
        wall = time.perf_counter() - start
    finally:
        await client.close()
    return Level(clients, len(results), sum(t for t, _ in results), wall, [f for _, f in results])


def bench_server(checkpoint: Path, batch: int, levels: list[int], args) -> list[Level]:
    server = ServerProcess(checkpoint, "--model-name", MODEL, "--max-batch-size", str(batch), *args.server_args,
                           command=[sys.executable, str(ROOT / "openai_api.py")], cwd=ROOT)
    try:
        server.wait()
        extra = {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}
        asyncio.run(run_level(server.url, 1, 1, 8, extra))  # warm up
        out = []
        for clients in levels:
            rounds = max(1, -(-args.min_requests // clients))
            level = asyncio.run(run_level(server.url, clients, rounds, args.max_tokens, extra))
            print(f"  batch {batch:>2}, {clients:>2} clients: {level.tokens_per_s:8.1f} tok/s", file=sys.stderr)
            out.append(level)
        return out
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--checkpoint", help="checkpoint folder (default: a tiny random one in a temp folder)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batching server")
    p.add_argument("--min-requests", type=int, default=32, help="requests per level at least")
    p.add_argument("--repetition-penalty", type=float,
                   help="sent with every request (default: the checkpoint's generation_config, 1.1 for chat)")
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more flags for openai_api.py")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from qwen.tiny import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(Path(tmp) / "tiny")
        started = time.perf_counter()
        runs = {batch: bench_server(checkpoint, batch, levels, args) for batch in (args.batch, 1)}
        elapsed = time.perf_counter() - started

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nServing {checkpoint.name if args.checkpoint else 'the tiny random checkpoint'}: streaming chat, "
          f"greedy, max_tokens {args.max_tokens}, repetition_penalty {args.repetition_penalty or 'default'}, "
          f"{os.cpu_count()} CPUs (load average {load} at the end), "
          f"{elapsed:.0f} s in all\n")
    print("| server | clients | requests | completion tokens | wall s | tokens/s | TTFT p50 ms | TTFT p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for batch, results in runs.items():
        name = f"batched (--max-batch-size {batch})" if batch > 1 else "unbatched (--max-batch-size 1)"
        for r in results:
            print(f"| {name} | {r.clients} | {r.requests} | {r.tokens} | {r.wall:.2f} | {r.tokens_per_s:.1f} | "
                  f"{r.ttft_ms(0.5):.0f} | {r.ttft_ms(0.95):.0f} |")
    top = levels.index(max(levels))
    ratio = runs[args.batch][top].tokens_per_s / runs[1][top].tokens_per_s
    verdict = "meets" if ratio >= 4 else "misses"
    print(f"\nAt {levels[top]} clients batching gives {ratio:.1f}x the tokens/s of one request at a time "
          f"({verdict} the 4x target).")


if __name__ == "__main__":
    main()
