"""The prefix cache and chunked prefill: what they save, and what they cost when nothing is shared.

    python bench/prefix_cache.py                 # Qwen-1.8B shape, random bf16 weights (~4 min on 2 cores)
    python bench/prefix_cache.py --shape tiny    # a quick self-check

Every figure comes from engines over the same weights in one process, taking turns: one with the defaults
(the prefix cache, prefill chunks of 2048 tokens), the reference with neither (no cache, each prompt
prefilled in one piece, as before the cache existed). Time to first token is from submitting a request
to its first token.

- Long chat: 6 turns of ~250-token user messages; the history replays a fixed assistant reply (as a chat
  client sends the text back) and each turn generates 16 tokens. With the cache a turn prefills the
  replayed reply and the new message; without it, the whole history.
- Agent loop: one ~1,000-token tools prompt before 4 different short questions.
- Chunked prefill: 8 streams decode while a 2,000-token prompt is admitted; the gaps between their tokens
  until that prompt's first token, with 512-token chunks and in one piece.
- Nothing shared: 8 different 200-token prompts, 16 new tokens, batch 8; the cache on but emptied before
  each round (it stores everything and finds nothing), with the default chunk and with chunks of 512,
  against neither: the cost of the cache, and of small chunks for a burst of prompts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from generate import build_model  # bench/generate.py (the script's folder is on sys.path)
from machine import cpu_name  # bench/machine.py

from qwen.chat import make_context
from qwen.engine import Engine
from qwen.sampling import SamplingParams
from qwen.tokenizer import QWenTokenizer

WHOLE = 10**6  # a prefill chunk no prompt reaches
WORDS = ("river mountain database compiler garden train music chess ocean bridge robot coffee desert volcano "
         "library satellite").split()


def text(tokens: int, seed: int, tokenizer) -> str:
    """Plain English-like text of about ``tokens`` tokens (one word is about one token)."""
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(len(WORDS), (tokens,), generator=g).tolist()]
    out = " ".join(words)
    while len(tokenizer.encode(out)) > tokens:
        words.pop()
        out = " ".join(words)
    return out


def ttft(engine: Engine, prompt: list[int], new_tokens: int) -> float:
    started = time.perf_counter()
    (seq,) = engine.generate([prompt], SamplingParams(max_new_tokens=new_tokens, do_sample=False))
    return seq.first_token_time - started


def long_chat(engines: dict[str, Engine], tokenizer, message_tokens: int, turns: int) -> dict[str, list[float]]:
    reply = text(60, seed=99, tokenizer=tokenizer)
    history: list[tuple[str, str]] = []
    out: dict[str, list[float]] = {name: [] for name in engines}
    for turn in range(turns):
        query = text(message_tokens, seed=turn, tokenizer=tokenizer)
        _, prompt = make_context(tokenizer, query, history, system="You are a helpful assistant.")
        for name, engine in engines.items():
            out[name].append(ttft(engine, prompt, 16))
        history.append((query, reply))
    return out


def agent_loop(engines: dict[str, Engine], tokenizer, tools_tokens: int, calls: int) -> dict[str, list[float]]:
    tools = text(tools_tokens, seed=1000, tokenizer=tokenizer)
    out: dict[str, list[float]] = {name: [] for name in engines}
    for call in range(calls):
        query = text(30, seed=2000 + call, tokenizer=tokenizer)
        _, prompt = make_context(tokenizer, query, [], system=tools)
        for name, engine in engines.items():
            out[name].append(ttft(engine, prompt, 4))
    return out


def stream_gaps(engine: Engine, tokenizer, streams: int, long_tokens: int) -> list[float]:
    """Seconds between consecutive tokens of running streams while a long prompt is admitted."""
    short = [tokenizer.encode(text(32, seed=3000 + i, tokenizer=tokenizer)) for i in range(streams)]
    seqs = [engine.submit(p, SamplingParams(max_new_tokens=10**4, do_sample=False)) for p in short]
    while not all(s.output_ids for s in seqs):
        engine.step()
    long = engine.submit(tokenizer.encode(text(long_tokens, seed=4000, tokenizer=tokenizer)),
                         SamplingParams(max_new_tokens=1, do_sample=False))
    gaps, last = [], time.perf_counter()
    while not long.done:
        engine.step()
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
    for seq in seqs:
        engine.cancel(seq)
    while engine.step():
        pass
    return gaps


def nothing_shared(engines: dict[str, Engine], tokenizer, rounds: int) -> dict[str, tuple[float, float]]:
    """Per engine: the median seconds and the median of its per-round ratio to "neither" (the engines take
    turns every round, so a machine that slows down over the run slows each round's pair alike)."""
    prompts = [tokenizer.encode(text(200, seed=5000 + i, tokenizer=tokenizer)) for i in range(8)]
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            if engine.prefix_cache is not None:
                engine.prefix_cache.clear()
            started = time.perf_counter()
            engine.generate(prompts, SamplingParams(max_new_tokens=16, do_sample=False))
            seconds[name].append(time.perf_counter() - started)
    return {name: (statistics.median(s), statistics.median(a / b for a, b in zip(s, seconds["neither"],
                                                                               strict=True)))
            for name, s in seconds.items()}


def print_series(title: str, column: str, series: dict[str, list[float]]) -> None:
    width = len(next(iter(series.values())))
    print(f"{title}:\n")
    print("| engine | " + " | ".join(f"{column} {i + 1}" for i in range(width)) + " |")
    print("|---|" + "---:|" * width)
    for name, values in series.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["1.8b", "tiny"], default="1.8b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the nothing-shared figure (medians)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tiny = args.shape == "tiny"
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.shape, getattr(torch, args.dtype), tmp, torch.device("cpu"))
    tokenizer = QWenTokenizer()

    def engines(batch: int = 1) -> dict[str, Engine]:
        # Every slot's cache grows to the longest sequence: one slot for one conversation keeps memory low.
        return {"cache": Engine(model, tokenizer, max_batch_size=batch, max_model_len=4096),
                "neither": Engine(model, tokenizer, max_batch_size=batch, max_model_len=4096, prefix_cache_bytes=0,
                                  prefill_chunk=WHOLE)}

    warm = Engine(model, tokenizer, max_batch_size=1, max_model_len=4096)  # first-call costs stay out of turn 1
    warm.generate([tokenizer.encode(text(300, seed=7, tokenizer=tokenizer))], SamplingParams(max_new_tokens=2))
    del warm

    started = time.perf_counter()
    chat = long_chat(engines(), tokenizer, 60 if tiny else 250, 6)
    agent = agent_loop(engines(), tokenizer, 250 if tiny else 1000, 4)
    long_tokens = 500 if tiny else 2000  # under 2048 keys: the slots' caches stay at 2048 positions
    gaps = {chunk: stream_gaps(Engine(model, tokenizer, max_batch_size=9, max_model_len=4096, prefix_cache_bytes=0,
                                      prefill_chunk=chunk), tokenizer, 8, long_tokens) for chunk in (512, WHOLE)}
    shared = nothing_shared({**engines(batch=8), "cache, chunks of 512": Engine(model, tokenizer, max_batch_size=8,
                                                                                max_model_len=4096, prefill_chunk=512)},
                            tokenizer, args.rounds)

    print(f"\nQwen-{args.shape} shape, random {args.dtype} weights, {args.threads} threads, {cpu_name()}, load "
          f"average {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all.\n")
    print_series("Long chat, time to first token per turn (s)", "turn", chat)
    print(f"\nTurn 6: {chat['neither'][-1] / chat['cache'][-1]:.1f}x faster with the cache.\n")
    print_series("Agent loop, time to first token per call (s)", "call", agent)
    print(f"\nWhile a {long_tokens}-token prompt is admitted, 8 running streams wait between tokens (s):\n")
    print("| prefill | steps | gap p50 | gap p99 | longest gap |")
    print("|---|---:|---:|---:|---:|")
    for chunk, g in gaps.items():
        q = statistics.quantiles(g, n=100, method="inclusive") if len(g) > 1 else g * 99
        label = "in chunks of 512" if chunk != WHOLE else "in one piece"
        print(f"| {label} | {len(g)} | {statistics.median(g):.2f} | {q[98]:.2f} | {max(g):.2f} |")
    print("\nNothing shared: 8 different 200-token prompts, 16 new tokens, batch 8 (medians of "
          f"{args.rounds} rounds):\n")
    print("| engine | seconds | time vs neither |")
    print("|---|---:|---:|")
    for name, (seconds, ratio) in shared.items():
        print(f"| {name} | {seconds:.2f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
