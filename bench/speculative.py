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
The break-even column is the acceptance at which a guess of k tokens pays for its wider forward (and, for a draft
model, for the draft's forwards), from their measured cost in plain steps (the run where every guess is kept) and
the expected tokens per draft (1 - a^(k+1)) / (1 - a) at acceptance a, for a fixed k (the engine adapts k, so a
sequence below break-even soon guesses less).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from generate import build_model  # bench/generate.py (the script's folder is on sys.path)
from machine import cpu_name
from results import add_json_arg, save

from qwen.engine import Engine
from qwen.quantize import quantize_int4_
from qwen.sampling import SamplingParams
from qwen.tokenizer import QWenTokenizer


def alphabet_prompt(size: int, length: int, seed: int) -> tuple[list[int], list[int]]:
    """``size`` token ids and a prompt of them that holds every pair (then random ones up to ``length``)."""
    letters = [1000 + 7 * i for i in range(size)]
    pairs = [t for i in range(size) for j in range(size) for t in (letters[i], letters[j])]
    gen = torch.Generator().manual_seed(seed)
    rest = [letters[i] for i in torch.randint(0, size, (max(0, length - len(pairs)),), generator=gen).tolist()]
    return letters, pairs + rest


def make_engine(model, tokenizer, batch: int, **kw) -> Engine:
    """An engine without the prefix cache (the rounds repeat their prompts)."""
    return Engine(model, tokenizer, max_batch_size=batch, prefix_cache_bytes=0, max_model_len=2048, **kw)


def decode_rate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> float:
    """Decode tokens/s: the tokens after each sequence's first over the time after the last first token."""
    seqs = [engine.submit(p, s) for p, s in zip(prompts, params, strict=True)]
    first = None
    while engine.step():
        if first is None and all(s.first_token_time is not None for s in seqs):
            first = time.perf_counter()
    return sum(len(s.output_ids) - 1 for s in seqs) / (time.perf_counter() - first)


def measure(engines: dict[str, Engine], prompts: list[list[int]], params: list[SamplingParams],
            rounds: int) -> dict[str, dict]:
    """Per engine (the first is plain decoding, the reference): median decode tok/s over ``rounds`` runs taking
    turns, the median per-round ratio to the reference, and what its guesses did in those runs."""
    rates: dict[str, list[float]] = {name: [] for name in engines}
    before = {name: (e.speculated.drafts, e.speculated.proposed, e.speculated.accepted) for name, e in engines.items()}
    reference = next(iter(engines))
    decode_rate(engines[reference], prompts, params)  # warm: the first run at a length pays for allocations
    for _ in range(rounds):
        for name, engine in engines.items():
            rates[name].append(decode_rate(engine, prompts, params))
    results = {}
    for name, engine in engines.items():
        counts = engine.speculated
        drafts, proposed, accepted = (now - then for now, then in zip(
            (counts.drafts, counts.proposed, counts.accepted), before[name], strict=True))
        results[name] = {
            "acceptance": accepted / proposed if proposed else 0.0,
            "tokens per draft": 1 + accepted / drafts if drafts else 1.0,
            "tok/s": statistics.median(rates[name]),
            "vs plain": statistics.median(a / b for a, b in zip(rates[name], rates[reference], strict=True)),
        }
    return results


def ngram_runs(model, tokenizer, args, ks: list[int], alphabets: list[int]) -> list[dict]:
    """Prompt lookup against plain decoding, per guess length and alphabet size (acceptance about 1 / A)."""
    engines = {"plain": make_engine(model, tokenizer, args.batch),
               **{f"k={k}": make_engine(model, tokenizer, args.batch, draft="ngram", num_speculative_tokens=k)
                  for k in ks}}
    rows = []
    for size in alphabets:
        letters, prompt = alphabet_prompt(size, 300, seed=size)
        bias = {t: 40.0 for t in letters}  # the alphabet's tokens, evenly (random weights: logits within ~0.1)
        params = [SamplingParams(max_new_tokens=args.new_tokens, do_sample=size > 1, temperature=1.0, seed=i,
                                 logit_bias=bias) for i in range(args.batch)]
        results = measure(engines, [prompt] * args.batch, params, args.rounds)
        for k in ks:
            rows.append({"alphabet": size, "k": k, **results[f"k={k}"], "plain tok/s": results["plain"]["tok/s"]})
    add_break_even(rows, ("k",), lambda r: r["alphabet"] == 1)
    return rows


def draft_runs(model, tokenizer, args, tmp: str) -> list[dict]:
    """Draft models against plain decoding: the model itself (a draft that costs a full step a token), its int4
    copy (the self-speculative setup), a 4-layer model of the same width (not for the tiny shape). Each guesses
    on random prompts without a bias (on random weights nearly nothing is kept: the floor) and under a bias to one
    token (A = 1; the draft guesses with the request's bias, so every guess is kept: the cost of guessing)."""
    drafts = {"the model itself": model, "its int4 copy": quantize_int4_(copy.deepcopy(model))}
    if args.shape != "tiny":  # (the tiny shape's is a checkpoint: no other one to compare)
        drafts["a 4-layer model"] = build_model(args.shape, torch.bfloat16, tmp, torch.device("cpu"),
                                                num_hidden_layers=4)
    gen = torch.Generator().manual_seed(0)
    random = torch.randint(0, 150000, (args.batch, 64), generator=gen).tolist()
    letters, prompt = alphabet_prompt(1, 64, seed=1)
    cases = {"random": (random, {}), "A = 1": ([prompt] * args.batch, {letters[0]: 40.0})}
    rows = []
    for k in (2, 4):
        engines = {"plain": make_engine(model, tokenizer, args.batch),
                   **{name: make_engine(model, tokenizer, args.batch, draft=d, num_speculative_tokens=k)
                      for name, d in drafts.items()}}
        for case, (prompts, bias) in cases.items():
            params = [SamplingParams(max_new_tokens=args.new_tokens, do_sample=False, logit_bias=bias) for _ in prompts]
            results = measure(engines, prompts, params, args.rounds)
            rows += [{"draft": name, "prompt": case, "k": k, **results[name], "plain tok/s": results["plain"]["tok/s"]}
                     for name in drafts]
    add_break_even(rows, ("draft", "k"), lambda r: r["prompt"] == "A = 1")
    return rows


def add_break_even(rows: list[dict], same: tuple[str, ...], full: Callable[[dict], bool]) -> None:
    """Each row's break-even acceptance for its guess length k: a forward that checks k guesses (and the guessing
    before it) costs, in plain steps, its tokens per draft over its speedup where every guess is kept (the ``full``
    row with the same values in ``same``); at acceptance a a draft yields (1 - a^(k+1)) / (1 - a) tokens."""
    for row in rows:
        ref = next((r for r in rows if full(r) and all(r[c] == row[c] for c in same)), None)
        row["cost in plain steps"] = ref["tokens per draft"] / ref["vs plain"] if ref else None
        row["break-even acceptance"] = break_even(row["k"], row["cost in plain steps"]) if ref else None


def print_table(rows: list[dict], cols: list[str]) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---:|" * len(cols))
    for row in rows:
        print("| " + " | ".join("-" if row[c] is None else f"{row[c]:.2f}" if isinstance(row[c], float)
                                else str(row[c]) for c in cols) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["1.8b", "tiny"], default="1.8b")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ks", default="1,2,4,8", help="guess lengths (num_speculative_tokens) of prompt lookup")
    parser.add_argument("--alphabets", default="1,2,4,16", help="alphabet sizes A: acceptance about 1/A")
    parser.add_argument("--part", choices=["all", "ngram", "draft"], default="all")
    add_json_arg(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(args.shape, torch.bfloat16, tmp, torch.device("cpu"))
        tokenizer = QWenTokenizer()
        if args.part in ("all", "ngram"):
            tables["ngram"] = ngram_runs(model, tokenizer, args, [int(k) for k in args.ks.split(",")],
                                         [int(a) for a in args.alphabets.split(",")])
        if args.part in ("all", "draft"):
            tables["draft"] = draft_runs(model, tokenizer, args, tmp)
    print(f"\nQwen-{args.shape} shape, random bf16 weights, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{cpu_name()}, load average {os.getloadavg()[0]:.1f}; median of {args.rounds} rounds, "
          f"{time.perf_counter() - started:.0f} s in all.\n")
    if "ngram" in tables:
        print("Prompt lookup (--speculative ngram), by alphabet size A (acceptance about 1/A):\n")
        print_table(tables["ngram"], ["alphabet", "k", "acceptance", "tokens per draft", "tok/s", "plain tok/s",
                                      "vs plain", "cost in plain steps", "break-even acceptance"])
    if "draft" in tables:
        print("\nDraft models (--draft-model), greedy, on random prompts and biased to one token (A = 1):\n")
        print_table(tables["draft"], ["draft", "prompt", "k", "acceptance", "tokens per draft", "tok/s",
                                      "plain tok/s", "vs plain", "cost in plain steps", "break-even acceptance"])
    save(args.json, "speculative", tables, batch=args.batch, shape=args.shape)


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
