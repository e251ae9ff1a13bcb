"""Evaluation speed: qwen's eval/ scripts against the original scripts' loop, on one random checkpoint.

    python bench/eval.py                        # hidden 256, 4 layers, fp32; ~4 min on 2 idle cores
    python bench/eval.py --shape 1.8b --mc-items 32 --gsm8k-items 8 --new-tokens 32   # Qwen-1.8B shape, bf16

Two tasks, each run three ways on the same data in the same process:

- multiple choice (C-Eval's 5-shot prompt): the original loop runs one prompt per forward pass and
  projects every position onto the vocabulary, then reads the last; ours is the evaluate_ceval.py
  program (``qwen.eval.tasks``), which scores batches of prompts ordered by their tokens, computes a
  batch's shared few-shot examples once and projects only the last position.
- generation (GSM8K's 8-shot prompt, greedy): the original loop calls ``model.generate`` once per
  question and cuts the text afterwards; ours is the evaluate_gsm8k.py program, which runs every
  question through the engine's continuous batching, reuses the examples' keys and values from the
  prefix cache and stops a question at its first cut marker.

Ours runs twice: with ``--prefix-cache-gb 0`` (no prefix shared: every prompt is computed whole) and with
the default, so the prefix cache's share of the speed-up shows apart. Ours is timed over the whole program
(loading, prompts, logging, results included); the original loop over its loop only. Items/s and the
speed-ups are printed with the number of predictions that differ from the original's (they must not: the
GSM8K completions are compared as text). The data is synthetic (the model is random), sized like the real
prompts: a C-Eval 5-shot prompt is ~600 tokens, a GSM8K 8-shot prompt ~900.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from machine import cpu_name  # bench/machine.py
from transformers import AutoModelForCausalLM, AutoTokenizer

import qwen  # noqa: F401  (registers the Auto classes)
from qwen.eval import extract, prompts, tasks
from qwen.eval.scoring import argmax_letter, letter_ids
from qwen.tiny import make_tiny_checkpoint

WORDS = "the of a number train apple river total price each more than twice half sum value city".split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_ceval(folder: Path, items: int, rng: random.Random) -> None:
    header = ["id", "question", "A", "B", "C", "D", "answer"]
    for split, count in (("dev", 5), ("val", items)):
        path = folder / split / f"computer_network_{split}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for i in range(count):
                options = [sentence(rng, 2, 12) for _ in range(4)]
                writer.writerow([i, sentence(rng, 20, 90), *options, rng.choice("ABCD")])


def original_multiple_choice(model, tokenizer, folder: Path, limit: int) -> tuple[list[str], float]:
    """The original evaluate_ceval.py loop at batch size 1."""
    from qwen.eval.data import read_ceval

    dev = read_ceval(folder, "computer_network", "dev")[:5]
    items = read_ceval(folder, "computer_network", "val")[:limit]
    letters = letter_ids(tokenizer, spaced=False)
    predictions = []
    start = time.perf_counter()
    with torch.no_grad():
        for item in items:
            ids = tokenizer(prompts.ceval_prompt(dev, item), return_tensors="pt").input_ids
            logits = model(ids).logits[:, -1].flatten()
            probs = torch.softmax(torch.softmax(logits, -1)[letters], -1)
            predictions.append(argmax_letter(probs.tolist()))
    return predictions, time.perf_counter() - start


def original_gsm8k(model, tokenizer, questions: list[str]) -> tuple[list[str], float]:
    """The original evaluate_gsm8k.py loop: one generate() per question, then the cut."""
    fewshot = prompts.read_prompt_file(None, prompts.GSM8K_PROMPT_FILE)
    config = model.generation_config
    config.do_sample = False
    completions = []
    start = time.perf_counter()
    with torch.no_grad():
        for question in questions:
            ids = tokenizer.encode(prompts.gsm8k_prompt(fewshot, question))
            out = model.generate(torch.tensor([ids]), generation_config=config)
            completions.append(extract.cut(tokenizer.decode(out[0, len(ids):].tolist()), extract.GSM8K_CUT))
    return completions, time.perf_counter() - start


SHAPES = {  # qwen.tiny's arguments and the weights' dtype
    "small": dict(layers=4, hidden=256, heads=4, intermediate=1024, dtype=torch.float32),
    "1.8b": dict(layers=24, hidden=2048, heads=16, intermediate=11008, dtype=torch.bfloat16),  # Qwen-1.8B's
}
CACHE_RUNS = (("--prefix-cache-gb 0", ["--prefix-cache-gb", "0"]), ("default (prefix cache)", []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--mc-items", type=int, default=64)
    parser.add_argument("--gsm8k-items", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256, help="max_new_tokens of the checkpoint (both runs)")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(0)
    work = Path(tempfile.mkdtemp(prefix="qwen-bench-eval-"))
    shape = dict(SHAPES[args.shape])
    dtype = shape.pop("dtype")
    checkpoint = make_tiny_checkpoint(work / "model", chat=False, dtype=dtype, **shape)
    generation = json.loads((checkpoint / "generation_config.json").read_text())
    (checkpoint / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": args.new_tokens}))
    write_ceval(work / "ceval", args.mc_items, rng)
    questions = [f"{sentence(rng, 10, 40)}. How many are there?" for _ in range(args.gsm8k_items)]
    (work / "gsm8k.jsonl").write_text("".join(json.dumps({"question": q, "answer": "#### 1"}) + "\n"
                                              for q in questions))
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    dtype_flag = str(dtype).removeprefix("torch.")
    common = ["-c", str(checkpoint), "--batch-size", str(args.batch_size), "--dtype", dtype_flag, "--no-progress",
              "--overwrite"]

    print(f"model: Qwen {args.shape} shape ({shape['layers']} layers, hidden {shape['hidden']}), vocabulary "
          f"151,936, {dtype_flag}, {torch.get_num_threads()} threads, {cpu_name()}; work folder {work}")
    rows = []
    reference, reference_s = original_multiple_choice(model, tokenizer, work / "ceval", args.mc_items)
    runs = []
    for _, flags in CACHE_RUNS:
        out = work / f"outs-mc-{len(flags)}"
        started = time.perf_counter()
        tasks.main_multiple_choice("ceval", [*common, *flags, "-d", str(work / "ceval"), "--subjects",
                                             "computer_network", "--out-dir", str(out)])
        seconds = time.perf_counter() - started
        ours = {json.loads(line)["doc_id"]: json.loads(line)["prediction"]
                for line in (out / "samples.jsonl").read_text().splitlines()}
        runs.append((seconds, [ours[f"computer_network/{i}"] for i in range(len(reference))]))
    rows.append(("C-Eval 5-shot (letter logits)", reference, reference_s, runs))

    reference, reference_s = original_gsm8k(model, tokenizer, questions)
    runs = []
    for _, flags in CACHE_RUNS:
        out = work / f"gsm8k_res-{len(flags)}.jsonl"
        started = time.perf_counter()
        tasks.main_gsm8k(False, [*common, *flags, "-f", str(work / "gsm8k.jsonl"), "-o", str(out)])
        seconds = time.perf_counter() - started
        ours = {json.loads(line)["doc_id"]: json.loads(line)["completion"] for line in out.read_text().splitlines()}
        runs.append((seconds, [ours[str(i)] for i in range(len(reference))]))
    rows.append((f"GSM8K 8-shot (greedy, <= {args.new_tokens} tokens)", reference, reference_s, runs))

    def differ(a: list[str], b: list[str]) -> int:
        return sum(x != y for x, y in zip(a, b, strict=True))

    print()
    print("| task | items | original loop items/s | " + " | ".join(f"qwen eval, {label}: items/s"
                                                           for label, _ in CACHE_RUNS)
          + " | speed-up over the original | prefix cache's part | predictions differing, cache on vs off | "
            "differing from the original loop (off, on) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, reference, ref_s, ((off_s, off), (on_s, on)) in rows:
        n = len(reference)
        print(f"| {name} | {n} | {n / ref_s:.2f} | {n / off_s:.2f} | {n / on_s:.2f} | {ref_s / on_s:.1f}x | "
              f"{off_s / on_s:.2f}x | {differ(off, on)} | {differ(off, reference)}, {differ(on, reference)} |")
    if dtype != torch.float32:
        print("\nIn bf16 a random model's next-token logits are near ties, so any other batch shape or kernel "
              "(the original loop runs one prompt at a time) flips some predictions; --shape small is fp32, where "
              "they must all agree.")

if __name__ == "__main__":
    main()
