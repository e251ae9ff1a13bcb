"""Serving throughput: the real ``openai_api.py`` server with continuous batching vs one request at a time.

    python bench/serve.py                      # tiny random checkpoint (made in a temp folder)
    python bench/serve.py -c FOLDER --max-tokens 128 --clients 1,8,32
    python bench/serve.py --reference no-prefix-cache --rounds 3   # what the prefix cache costs

The server is started twice per round (subprocesses on 127.0.0.1), the two in turn: ``--max-batch-size 16``
and, as the reference, ``--max-batch-size 1`` (or, with ``--reference no-prefix-cache``, the same batching
server with ``--prefix-cache-gb 0``: every prompt here is different, so nothing is shared and the cache only
costs its bookkeeping). For each number of concurrent clients, every client streams chat completions
(greedy, ``max_tokens`` tokens, a different prompt per request) with ``openai.AsyncOpenAI``. Aggregate
tokens/s is the completion tokens reported by the server (``stream_options.include_usage``) over the
wall time of the whole wave; time to first token is from sending a request to its first content chunk.
Each level runs at least ``--min-requests`` requests (clients send several) so the percentiles of one
client are not a single sample. Prints a markdown table (each row the round with the median tokens/s) and
the ratio of the two servers at the most clients (the median of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import openai
from machine import cpu_name  # bench/machine.py
from results import add_json_arg, save

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


def bench_server(checkpoint: Path, flags: list[str], levels: list[int], args) -> list[Level]:
    server = ServerProcess(checkpoint, "--model-name", MODEL, *flags, *args.server_args,
                           command=[sys.executable, str(ROOT / "openai_api.py")], cwd=ROOT)
    try:
        server.wait()
        extra = {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}
        asyncio.run(run_level(server.url, 1, 1, 8, extra))  # warm up
        out = []
        for clients in levels:
            rounds = max(1, -(-args.min_requests // clients))
            level = asyncio.run(run_level(server.url, clients, rounds, args.max_tokens, extra))
            print(f"  {' '.join(flags)}, {clients:>2} clients: {level.tokens_per_s:8.1f} tok/s", file=sys.stderr)
            out.append(level)
        return out
    finally:
        server.stop()


def servers(args) -> dict[str, list[str]]:
    """The server under test and its reference: a name for the table and openai_api.py's flags."""
    batched = ["--max-batch-size", str(args.batch)]
    if args.reference == "unbatched":
        return {f"batched (--max-batch-size {args.batch})": batched,
                "unbatched (--max-batch-size 1)": ["--max-batch-size", "1"]}
    return {f"prefix cache on (default), --max-batch-size {args.batch}": batched,
            "--prefix-cache-gb 0": [*batched, "--prefix-cache-gb", "0"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--checkpoint", help="checkpoint folder (default: a tiny random one in a temp folder)")
    p.add_argument("--clients", default="1,4,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="--max-batch-size of the batching server")
    p.add_argument("--min-requests", type=int, default=32, help="requests per level at least")
    p.add_argument("--reference", choices=["unbatched", "no-prefix-cache"], default="unbatched",
                   help="what the batching server is compared with (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="times each server is started and measured, in turn")
    p.add_argument("--repetition-penalty", type=float,
                   help="sent with every request (default: the checkpoint's generation_config, 1.1 for chat)")
    add_json_arg(p)
    p.add_argument("--server-args", nargs=argparse.REMAINDER, default=[], help="more flags for openai_api.py")
    args = p.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    named = servers(args)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from qwen.tiny import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(Path(tmp) / "tiny")
        started = time.perf_counter()
        rounds: list[dict[str, list[Level]]] = []
        for r in range(args.rounds):
            order = list(named) if r % 2 == 0 else list(named)[::-1]
            rounds.append({name: bench_server(checkpoint, named[name], levels, args) for name in order})
        elapsed = time.perf_counter() - started

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nServing {checkpoint.name if args.checkpoint else 'the tiny random checkpoint'}: streaming chat, "
          f"greedy, max_tokens {args.max_tokens}, repetition_penalty {args.repetition_penalty or 'default'}, "
          f"{os.cpu_count()} CPUs ({cpu_name()}, load average {load} at the end), {args.rounds} round(s), "
          f"{elapsed:.0f} s in all\n")
    print("| server | clients | requests | completion tokens | wall s | tokens/s | TTFT p50 ms | TTFT p95 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    table = []
    for name in named:
        for i in range(len(levels)):
            by_speed = sorted((run[name][i] for run in rounds), key=lambda level: level.tokens_per_s)
            r = by_speed[(len(by_speed) - 1) // 2]
            print(f"| {name} | {r.clients} | {r.requests} | {r.tokens} | {r.wall:.2f} | {r.tokens_per_s:.1f} | "
                  f"{r.ttft_ms(0.5):.0f} | {r.ttft_ms(0.95):.0f} |")
            table.append({"server": name, "clients": r.clients, "requests": r.requests, "tokens/s": r.tokens_per_s,
                          "TTFT p50 ms": r.ttft_ms(0.5), "TTFT p95 ms": r.ttft_ms(0.95)})
    save(args.json, "serve", {"servers": table}, max_tokens=args.max_tokens,
         checkpoint=checkpoint.name if args.checkpoint else "tiny random")
    top = levels.index(max(levels))
    tested, reference = named
    ratio = statistics.median(run[tested][top].tokens_per_s / run[reference][top].tokens_per_s for run in rounds)
    if args.reference == "unbatched":
        verdict = "meets" if ratio >= 4 else "misses"
        print(f"\nAt {levels[top]} clients batching gives {ratio:.1f}x the tokens/s of one request at a time "
              f"({verdict} the 4x target).")
    else:
        verdict = "within" if ratio >= 0.97 else "over"
        print(f"\nAt {levels[top]} clients, nothing shared, the prefix cache's server gives {ratio:.3f}x the "
              f"tokens/s of the one without ({verdict} the 3% bound).")


if __name__ == "__main__":
    main()
