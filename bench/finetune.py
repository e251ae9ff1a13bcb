"""Memory and speed of fine-tuning (LoRA, LoRA with embeddings, Q-LoRA, full) per sequence length.

    python bench/finetune.py [--layers 2 --hidden 64 --heads 4 --intermediate 128] [--lengths 256 512 1024]
                             [--methods lora lora_emb qlora full] [--steps 3] [--grad-accum 8]

The setup of the original README's table: batch size 1, gradient accumulation 8, one sample of
exactly each length (an assistant answer long enough to be truncated to it), gradient checkpointing
on, AdamW. Each cell runs ``qwen.finetune.train`` in a fresh process on a random checkpoint of the
given shape (``qwen.tiny``; chat model, or base model for "LoRA (emb)", which also trains wte and
lm_head) and reports

* memory: peak RSS of that process (``ru_maxrss``: weights, optimizer, activations, and the ~0.6 GB
  of Python, torch and transformers themselves), on a GPU the peak allocated CUDA memory;
* speed: seconds per optimizer step (8 forward/backward passes): the fastest of the timed steps (the
  first step is not timed). The fastest, not the mean, because a shared machine's other jobs only
  ever add time.

Prints a Markdown table in the original's layout: "memory / s/it".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = {"lora": "LoRA", "lora_emb": "LoRA (emb)", "qlora": "Q-LoRA", "full": "Full-parameter"}


def child(args: argparse.Namespace) -> None:
    """One cell: train a few steps and print {"memory_gb", "s_per_it"} as JSON on the last line."""
    import torch
    from transformers import TrainerCallback

    from qwen.finetune import train

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_begin(self, *a, **k) -> None:
            if not self.stamps:
                self.stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k) -> None:
            self.stamps.append(time.perf_counter())

    timer = Timer()
    argv = [
        "--model_name_or_path", args.model, "--data_path", args.data, "--output_dir", args.out,
        "--max_steps", str(args.steps), "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", str(args.grad_accum), "--model_max_length", str(args.length),
        "--gradient_checkpointing", "True", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True",
        "--learning_rate", "1e-5", "--logging_steps", "1000",
    ]
    if not torch.cuda.is_available():
        argv += ["--use_cpu", "True"]
    else:
        argv += ["--bf16", "True"]
    if args.method != "full":
        argv += ["--use_lora"]
    if args.method == "qlora":
        argv += ["--q_lora"]
    train(argv, callbacks=[timer])
    steps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    if torch.cuda.is_available():
        memory = torch.cuda.max_memory_allocated() / 2**30
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"memory_gb": memory, "s_per_it": min(steps[1:] or steps)}))


def make_data(path: Path, length: int, copies: int) -> None:
    """``copies`` samples of exactly ``length`` tokens (an answer well over it, truncated), so that every
    optimizer step really accumulates over --grad-accum samples."""
    answer = " ".join(f"word{i}" for i in range(length))
    samples = [{"id": f"long{i}", "conversations": [{"from": "user", "value": "Write a long text."},
                                                    {"from": "assistant", "value": answer}]} for i in range(copies)]
    path.write_text(json.dumps(samples))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per cell (the first is not timed)")
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from qwen.tiny import make_tiny_checkpoint

    shape = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, intermediate=args.intermediate)
    results: dict[tuple[str, int], str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        chat = make_tiny_checkpoint(Path(tmp, "chat"), **shape)
        base = make_tiny_checkpoint(Path(tmp, "base"), chat=False, **shape)
        for length in args.lengths:
            data = Path(tmp, f"data{length}.json")
            make_data(data, length, args.grad_accum * args.steps)
            for method in args.methods:
                cmd = [sys.executable, __file__, "--child", "--method", method, "--length", str(length),
                       "--model", str(base if method == "lora_emb" else chat), "--data", str(data),
                       "--out", str(Path(tmp, f"out-{method}-{length}")), "--steps", str(args.steps),
                       "--grad-accum", str(args.grad_accum)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    results[(method, length)] = "failed"
                    continue
                cell = json.loads(proc.stdout.strip().splitlines()[-1])
                results[(method, length)] = f"{cell['memory_gb']:.2f}G / {cell['s_per_it']:.2f}s/it"
                print(f"{METHODS[method]:>15} {length:>5}: {results[(method, length)]}", file=sys.stderr, flush=True)

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    n_params = sum(v for v in _param_count(shape).values())
    print(f"\nModel: random Qwen, {args.layers} layers, hidden {args.hidden} ({n_params / 1e6:.1f}M parameters); "
          f"{device}; batch 1, gradient accumulation {args.grad_accum}.\n")
    print("| Method | #Nodes | #GPUs per node | " + " | ".join(f"Sequence Length {n}" for n in args.lengths) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in args.lengths) + " |")
    gpus = "1" if torch.cuda.is_available() else "0 (CPU)"
    for method in args.methods:
        cells = " | ".join(results[(method, n)] for n in args.lengths)
        print(f"| {METHODS[method]} | 1 | {gpus} | {cells} |")


def _param_count(shape: dict) -> dict[str, int]:
    from qwen.tiny import original_config, weight_shapes

    config = original_config(shape["layers"], shape["hidden"], shape["heads"], shape["intermediate"], 151936, 8192)
    out = {}
    for name, dims in weight_shapes(config).items():
        n = 1
        for d in dims:
            n *= d
        out[name] = n
    return out


if __name__ == "__main__":
    main()
