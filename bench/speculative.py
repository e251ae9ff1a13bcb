"""Speculative decoding with prompt lookup (``--speculative ngram``): its speed against plain decoding, by acceptance.

    python bench/speculative.py                  # Qwen-1.8B shape, random bf16 weights, batch 1
    python bench/speculative.py --batch 8 --shape tiny

Random weights make real replies meaningless, so the bench sets the acceptance itself with a logit bias over an
alphabet of A tokens (the prompt holds every pair of them, so every step has a guess): A = 1 makes the reply one
token over and over, every guess kept (the upper bound); sampling evenly among A tokens keeps a guess with
probability 1/A (A = 2: about half; A = 16: 6%, about the floor, where the guesses shrink to one token).
Plain decoding runs the same requests in the same rounds (the reference); each row is the median over
``--rounds`` of decode tokens/s (tokens after the first over the time after the first token) and its ratio to
plain decoding's in the same round. "tokens per draft" is what a sequence gets from one checked guess.
The break-even column is the acceptance at which a guess of k tokens pays for its wider forward, from the
measured cost of that forward (acceptance 1) and the expected tokens per draft (1 - a^(k+1)) / (1 - a).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from generate import build_model  # bench/generate.py (the script's folder is on sys.path)
from machine import cpu_name
from results import add_json_arg, save

from qwen.engine import Engine
from qwen.sampling import SamplingParams
from qwen.tokenizer import QWenTokenizer


def alphabet_prompt(size: int, length: int, seed: int) -> tuple[list[int], list[int]]:
    """``size`` token ids and a prompt of them that holds every pair (then random ones up to ``length``)."""
    letters = [1000 + 7 * i for i in range(size)]
    pairs = [t for i in range(size) for j in range(size) for t in (letters[i], letters[j])]
    gen = torch.Generator().manual_seed(seed)
    rest = [letters[i] for i in torch.randint(0, size, (max(0, length - len(pairs)),), generator=gen).tolist()]
    return letters, pairs + rest


def decode_rate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """Decode tokens/s: the tokens after each sequence's first over the time after the last first token."""
    seqs = [engine.submit(p, s) for p, s in zip(prompts, params, strict=True)]
    first = None
    while engine.step():
        if first is None and all(s.first_token_time is not None for s in seqs):
            first = time.perf_counter()
    return sum(len(s.output_ids) - 1 for s in seqs) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["1.8b", "tiny"], default="1.8b")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ks", default="1,2,4,8", help="guess lengths (num_speculative_tokens) to run")
    parser.add_argument("--alphabets", default="1,2,4,16", help="alphabet sizes A: acceptance about 1/A")
    add_json_arg(parser)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    alphabets = [int(a) for a in args.alphabets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.shape, torch.bfloat16, tmp, torch.device("cpu"))
    tokenizer = QWenTokenizer()
    engines = {0: Engine(model, tokenizer, max_batch_size=args.batch, prefix_cache_bytes=0, max_model_len=2048)}
    for k in ks:
        engines[k] = Engine(model, tokenizer, max_batch_size=args.batch, prefix_cache_bytes=0, max_model_len=2048,
                            draft="ngram", num_speculative_tokens=k)

    rows = []
    started = time.perf_counter()
    for size in alphabets:
        letters, prompt = alphabet_prompt(size, 300, seed=size)
        bias = {t: 40.0 for t in letters}  # the alphabet's tokens, evenly (random weights: logits within ~0.1)
        params = [SamplingParams(max_new_tokens=args.new_tokens, do_sample=size > 1, temperature=1.0, seed=i,
                                 logit_bias=bias) for i in range(args.batch)]
        prompts = [prompt] * args.batch
        rates: dict[int, list[float]] = {k: [] for k in engines}
        before = {k: (e.speculated.drafts, e.speculated.proposed, e.speculated.accepted) for k, e in engines.items()}
        decode_rate(engines[0], prompts, params)  # warm: the first run at a length pays for allocations
        for _ in range(args.rounds):
            for k, engine in engines.items():
                rates[k].append(decode_rate(engine, prompts, params))
        for k in ks:
            counts = engines[k].speculated
            drafts, proposed, accepted = (now - then for now, then in zip(
                (counts.drafts, counts.proposed, counts.accepted), before[k], strict=True))
            rows.append({
                "alphabet": size, "k": k, "acceptance": accepted / proposed if proposed else 0.0,
                "tokens per draft": 1 + accepted / drafts if drafts else 1.0,
                "tok/s": statistics.median(rates[k]), "plain tok/s": statistics.median(rates[0]),
                "vs plain": statistics.median(a / b for a, b in zip(rates[k], rates[0], strict=True)),
            })
    # A forward that checks k guesses costs, in plain steps, its tokens over its speedup where all are kept.
    for row in rows:
        full = next((r for r in rows if r["k"] == row["k"] and r["acceptance"] == 1.0), None)
        cost = full["tokens per draft"] / full["vs plain"] if full else None
        row["break-even acceptance"] = break_even(row["k"], cost) if cost else None

    print(f"\nQwen-{args.shape} shape, random bf16 weights, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{cpu_name()}, load average {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds, "
          f"{time.perf_counter() - started:.0f} s in all.\n")
    cols = ["alphabet", "k", "acceptance", "tokens per draft", "tok/s", "plain tok/s", "vs plain",
            "break-even acceptance"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for row in rows:
        print("| " + " | ".join("-" if row[c] is None else f"{row[c]:.2f}" if isinstance(row[c], float)
                                else str(row[c]) for c in cols) + " |")
    save(args.json, "speculative", {"runs": rows}, batch=args.batch, shape=args.shape)


def break_even(k: int, cost: float) -> float | None:
    """The acceptance a at which a guess of ``k`` tokens yields ``cost`` tokens per draft, (1 - a^(k+1)) / (1 - a)
    (the wider forward's cost in plain steps); None when even acceptance 1 does not."""
    if cost <= 1:
        return 0.0
    if cost >= k + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):
        a = (low + high) / 2
        low, high = (a, high) if sum(a**i for i in range(k + 1)) < cost else (low, a)
    return (low + high) / 2


if __name__ == "__main__":
    main()
