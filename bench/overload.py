"""Overload: 64 concurrent clients against the real server, with a bounded and an unbounded queue.

    python bench/overload.py                     # tiny random checkpoint, 64 clients, 60 s per server
    python bench/overload.py --clients 128 --duration 180
    python bench/overload.py --soak              # the bounded server alone for 10 minutes: does memory grow?

Two ``openai_api.py`` servers run in turn under the same load (``--max-batch-size 8``): one with
``--max-queue 16`` (a request arriving while 16 wait is answered 503 with Retry-After at once) and the
reference, ``--max-queue`` large enough never to refuse, as before the flag existed. Every client
streams chat completions in a loop for ``--duration`` seconds; a refused client waits Retry-After and
tries again. Reported per server: completed requests, 503 refusals, errors and hung requests (no
answer within 120 s; both must be 0: nothing lost or hung), completion tokens/s, time to first token
per request as its client sees it (from the first attempt, so the waits after 503s count; p50/p99), and
the server's resident memory (sampled from /proc every 0.5 s): peak, the mean of the last quarter of the
run against the first (flat when close to 1), and its growth in MiB per minute over the second half (a
least-squares slope; a leak shows as a steady positive slope in a soak run, where start-up allocations
have long settled).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai

from qwen.serve.process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench"


@dataclass
class Run:
    completed: int = 0
    refused: int = 0
    errors: int = 0
    hung: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)  # per request, from its first attempt to its first token
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)

    def ttft_ms(self, q: float) -> float:
        values = sorted(self.ttft) or [float("nan")]
        return 1000 * values[min(len(values) - 1, round(q * (len(values) - 1)))]

    def rss_drift(self) -> float:
        """Mean RSS of the last quarter of the samples over the first's."""
        sizes = [b for _, b in self.rss]
        quarter = max(1, len(sizes) // 4)
        return (sum(sizes[-quarter:]) / quarter) / (sum(sizes[:quarter]) / quarter) if sizes else float("nan")

    def rss_slope(self) -> float:
        """RSS growth over the second half of the run, MiB per minute (least squares)."""
        half = self.rss[len(self.rss) // 2:]
        if len(half) < 2:
            return float("nan")
        mean_t = sum(t for t, _ in half) / len(half)
        mean_b = sum(b for _, b in half) / len(half)
        var = sum((t - mean_t) ** 2 for t, _ in half)
        return sum((t - mean_t) * (b - mean_b) for t, b in half) / var * 60 / 2**20 if var else float("nan")


def watch_rss(pid: int, out: list[tuple[float, int]], stop: threading.Event) -> None:
    page, start = os.sysconf("SC_PAGE_SIZE"), time.perf_counter()
    while not stop.wait(0.5):
        try:
            with open(f"/proc/{pid}/statm") as f:
                out.append((time.perf_counter() - start, int(f.read().split()[1]) * page))
        except OSError:
            return


async def client_loop(client: openai.AsyncOpenAI, index: int, deadline: float, max_tokens: int, run: Run) -> None:
    start = None  # the request's first attempt: a retry after a 503 is the same request to its user
    while time.perf_counter() < deadline:
        start, first = start or time.perf_counter(), None
        try:
            stream = await asyncio.wait_for(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Client {index}: tell me a story."}],
                max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}), 120)
            async with asyncio.timeout(120):
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                    if chunk.usage is not None:
                        run.tokens += chunk.usage.completion_tokens
            run.completed += 1
            run.ttft.append(first if first is not None else time.perf_counter() - start)
            start = None
        except openai.APIStatusError as exc:
            if exc.status_code != 503:
                run.errors += 1
                start = None
                continue
            run.refused += 1
            await asyncio.sleep(float(exc.response.headers.get("retry-after", "1")))
        except TimeoutError:
            run.hung += 1
            start = None
        except openai.APIError:
            run.errors += 1
            start = None


async def drive(url: str, clients: int, duration: float, max_tokens: int, run: Run) -> float:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=180)
    try:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i, start + duration, max_tokens, run) for i in range(clients)))
        return time.perf_counter() - start
    finally:
        await client.close()


def bench(checkpoint: Path, max_queue: int, args: argparse.Namespace) -> tuple[Run, float]:
    run = Run()
    with ServerProcess(checkpoint, "--model-name", MODEL, "--max-batch-size", "8", "--max-queue", str(max_queue),
                       command=[sys.executable, str(ROOT / "openai_api.py")], cwd=ROOT) as server:
        stop = threading.Event()
        watcher = threading.Thread(target=watch_rss, args=(server.proc.pid, run.rss, stop), daemon=True)
        watcher.start()
        try:
            wall = asyncio.run(drive(server.url, args.clients, args.duration, args.max_tokens, run))
        finally:
            stop.set()
            watcher.join()
    return run, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--checkpoint", help="checkpoint folder (default: a tiny random one in a temp folder)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=60, help="seconds of load per server")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=16, help="the bounded server's --max-queue")
    p.add_argument("--soak", action="store_true",
                   help="the bounded server alone, for --duration seconds (default here 600): a memory leak check")
    args = p.parse_args()
    if args.soak and "--duration" not in sys.argv:
        args.duration = 600.0
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from qwen.tiny import make_tiny_checkpoint

            checkpoint = make_tiny_checkpoint(Path(tmp) / "tiny")
        rows = {f"--max-queue {args.max_queue}": bench(checkpoint, args.max_queue, args)}
        if not args.soak:
            rows["unbounded (reference)"] = bench(checkpoint, 1_000_000, args)
    print(f"\n{args.clients} clients streaming chat (greedy, max_tokens {args.max_tokens}) for {args.duration:.0f} s "
          f"per server, --max-batch-size 8, {os.cpu_count()} CPUs\n")
    print("TTFT: per request, from its first attempt (waits after 503s included) to its first token\n")
    print("| server | completed | 503 refused | errors | hung | tokens/s | TTFT p50 ms | TTFT p99 ms | "
          "peak RSS MiB | RSS last/first quarter | RSS MiB/min, 2nd half |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, (run, wall) in rows.items():
        peak = max((b for _, b in run.rss), default=0) / 2**20
        print(f"| {name} | {run.completed} | {run.refused} | {run.errors} | {run.hung} | {run.tokens / wall:.1f} | "
              f"{run.ttft_ms(0.5):.0f} | {run.ttft_ms(0.99):.0f} | {peak:.0f} | {run.rss_drift():.3f} | "
              f"{run.rss_slope():+.2f} |")


if __name__ == "__main__":
    main()
