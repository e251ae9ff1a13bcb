"""LoRA adapters served unmerged (qwen/lora.py): what they cost a decode step, and what they hold in memory.

    python bench/lora.py                      # Qwen-1.8B shape, random bf16 weights, ranks 8 and 64 (~6 min on 2 cores)
    python bench/lora.py --ranks 8 --rounds 2 --new-tokens 16
    python bench/lora.py --quick              # the tiny checkpoint: a smoke run of every part (seconds)

Every figure comes from one process and one engine over one set of weights, with random adapters written as
PEFT folders (``write_adapter``) and read by ``qwen.lora.load_lora``, as a server's ``--lora`` reads them.

- Decode tokens/s (all rows of the batch together) for the base model alone, every row on one adapter, and
  8 rows on 4 adapters (rows 0-7 on adapters 0, 1, 2, 3, 0, 1, 2, 3: one batch that mixes them), at
  batch 1 and 8; against the same 4 adapters run one after another (4 batches of 2 rows each, their step
  times summed), the way to serve them without mixing. A rate is the batch's rows over its median decode
  step (the engine's steps after the first, which prefills every prompt), so prompt processing is excluded
  and a slow spell of a few steps does not count. The base runs on the same model, whose layers are wrapped
  in ``LoraLayer`` once an adapter is loaded, as on a server with adapters: the wrappers cost a Python call
  each. The configurations take turns for ``--rounds`` rounds and each keeps its best, so a slow spell of
  this shared machine hits all of them alike.
- Memory per resident adapter (``LoraAdapter.nbytes``), also as a share of the base model's weights.
- One layer's LoRA delta alone (the c_attn shape, hidden -> 3 x hidden: 2048 -> 6144 at the 1.8B shape),
  computed both common ways: grouped by adapter (``LoraLayer``'s own code: per adapter, its rows, two small
  matmuls, added back to those rows) and gathered per row (a copy of each row's adapter matrices gathered by
  index, then batched matmuls). Grouping reads each adapter's matrices once per step, gathering once per row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from generate import build_model, nbytes  # bench/generate.py (the script's folder is on sys.path)
from machine import cpu_name  # bench/machine.py
from safetensors.torch import save_file
from torch import nn

from qwen.cpu_kernels import use_cpu_kernels_
from qwen.engine import Engine
from qwen.lora import (
    PEFT_PREFIX,
    Delta,
    Groups,
    LoraAdapter,
    LoraLayer,
    delta_dtype,
    load_lora,
    row_groups,
    use_lora,
)
from qwen.modeling import QWenLMHeadModel
from qwen.sampling import SamplingParams
from qwen.tokenizer import QWenTokenizer

TARGETS = ("c_attn", "c_proj", "w1", "w2")  # c_proj: the attention's and the MLP's
MIXED = 4  # adapters in the mixed batch
PROMPT_LEN = 32
# (rows, seconds of one decode step) of one configuration's run, given its new tokens per row
Run = Callable[[int], tuple[int, float]]


def write_adapter(model: QWenLMHeadModel, folder: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA folder for ``model`` with small random A and B, in bf16. Written directly rather than by
    ``peft.get_peft_model``, which would need a copy of the whole model; B is not zero (PEFT's initial
    value), so the adapter changes every targeted layer's output, as a trained one does."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and isinstance(layer, nn.Linear):
            key = PEFT_PREFIX + name
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, layer.in_features, generator=generator) * 0.02).to(
                torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(layer.out_features, rank, generator=generator) * 0.02).to(
                torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "bias": "none", "base_model_name_or_path": "Qwen/Qwen-1_8B-Chat"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def load_adapters(model: QWenLMHeadModel, ranks: list[int], tmp: str) -> dict[int, list[LoraAdapter]]:
    """``MIXED`` different adapters of each rank, loaded onto ``model`` (all written before the first load,
    which wraps the model's layers)."""
    folders = {rank: [write_adapter(model, Path(tmp, f"r{rank}-{i}"), rank, seed=100 * rank + i)
                      for i in range(MIXED)] for rank in ranks}
    adapters = {rank: [load_lora(model, folder) for folder in paths] for rank, paths in folders.items()}
    for rank, loaded in adapters.items():
        for adapter in loaded:
            if adapter.rank != rank or adapter.targets != sorted(TARGETS):
                raise RuntimeError(f"{adapter.path} loaded as rank {adapter.rank} on {adapter.targets}")
    return adapters


def decode(engine: Engine, prompts: list[list[int]], adapters: list[LoraAdapter | None], new_tokens: int
           ) -> tuple[int, float]:
    """(rows, median seconds of a decode step) of one batch run to ``new_tokens`` tokens a row. The first step
    prefills every prompt (one chunk holds them all) and decodes once; each later one decodes once."""
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    seqs = [engine.submit(p, params, adapter=a) for p, a in zip(prompts, adapters, strict=True)]
    engine.step()
    steps, more = [], True
    while more:
        started = time.perf_counter()
        more = engine.step()
        steps.append(time.perf_counter() - started)
    if any(len(s.output_ids) != new_tokens for s in seqs) or len(steps) != new_tokens - 2:
        raise RuntimeError("the batch did not decode all its rows in every step")
    return len(seqs), statistics.median(steps)


def configurations(engine: Engine, prompts: list[list[int]], adapters: dict[int, list[LoraAdapter]]
                   ) -> dict[tuple[str, int, int | None], Run]:
    """The runs to time, keyed by (what, batch, rank)."""

    def batch(rows: list[LoraAdapter | None]) -> Run:
        return lambda new: decode(engine, prompts[:len(rows)], rows, new)

    def one_after_another(loaded: list[LoraAdapter]) -> Run:
        """Each adapter's rows of the mixed batch as a batch of their own, one after another."""
        def run(new: int) -> tuple[int, float]:
            parts = [decode(engine, prompts[i::MIXED], [a] * len(prompts[i::MIXED]), new)
                     for i, a in enumerate(loaded)]
            return sum(p[0] for p in parts), sum(p[1] for p in parts)
        return run

    runs: dict[tuple[str, int, int | None], Run] = {("base", 1, None): batch([None]),
                                                    ("base", 8, None): batch([None] * 8)}
    for rank, loaded in adapters.items():
        runs["1 adapter", 1, rank] = batch(loaded[:1])
        runs["1 adapter", 8, rank] = batch(loaded[:1] * 8)
        runs[f"{MIXED} adapters, mixed in one batch", 8, rank] = batch(loaded * (8 // MIXED))
        runs[f"{MIXED} adapters, one after another", 8, rank] = one_after_another(loaded)
    return runs


def best_rates(runs: dict[tuple[str, int, int | None], Run], rounds: int, new_tokens: int
               ) -> dict[tuple[str, int, int | None], float]:
    """Decode tokens/s of each run, the best of ``rounds`` turns (the runs take turns every round)."""
    for run in runs.values():  # the first run of a shape also pays for allocations
        run(3)
    rates = dict.fromkeys(runs, 0.0)
    for _ in range(rounds):
        for key, run in runs.items():
            rows, seconds = run(new_tokens)
            rates[key] = max(rates[key], rows / seconds)
    return rates


class Zeros(nn.Module):
    """A base layer that costs next to nothing, so that timing a ``LoraLayer`` over it times the deltas."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def grouped(layer: LoraLayer, x: torch.Tensor, groups: Groups) -> torch.Tensor:
    """``layer`` with ``groups``' adapters on their rows, as the engine runs it: grouped by adapter."""
    with use_lora(groups):
        return layer(x)


def gathered(x: torch.Tensor, downs: torch.Tensor, ups: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The other way to mix adapters in a batch: each row gets a copy of its adapter's A [r, in] and s*B
    [out, r] (``downs``/``ups`` stack every adapter's), then batched matmuls, one row per batch entry."""
    y = x.new_zeros(x.shape[0], ups.shape[1])
    down = torch.bmm(x[:, None].to(downs.dtype), downs[index].transpose(1, 2))
    y += torch.bmm(down, ups[index].transpose(1, 2))[:, 0]
    return y


def microseconds(fns: dict[str, Callable[[], object]], repeats: int, bursts: int = 5) -> dict[str, float]:
    """Each function's best time per call over ``bursts`` bursts of ``repeats`` calls (after one untimed call);
    the functions take turns burst by burst."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(bursts):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[name] = min(best[name], (time.perf_counter() - started) / repeats * 1e6)
    return best


def layer_bench(hidden: int, ranks: list[int], repeats: int) -> list[dict]:
    """One c_attn-shaped layer (``hidden`` -> 3 x ``hidden``): the base layer, and its LoRA delta grouped
    (``LoraLayer``) and gathered (``gathered``), at batch 1 (one adapter) and 8 (``MIXED`` adapters)."""
    out_features, dtype = 3 * hidden, torch.bfloat16
    base = use_cpu_kernels_(nn.Sequential(nn.Linear(hidden, out_features, dtype=dtype)))  # as the model's c_attn
    layer = LoraLayer(Zeros(out_features), "c_attn")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for rank in ranks:
        small = delta_dtype(torch.device("cpu"), dtype)  # as load_lora keeps them
        downs = (torch.randn(MIXED, rank, hidden, generator=generator) * 0.02).to(small)
        ups = (torch.randn(MIXED, out_features, rank, generator=generator) * 0.04).to(small)
        adapters = [LoraAdapter(f"a{i}", Path(f"a{i}"), None, {"c_attn": [Delta(downs[i], ups[i], slice(None))]})
                    for i in range(MIXED)]
        for batch in (1, 8):
            x = torch.randn(batch, hidden, generator=generator).to(dtype)
            assigned = [adapters[i % MIXED] for i in range(batch)]
            fns = {"base": partial(base, x), "grouped": partial(grouped, layer, x, row_groups(assigned, x.device)),
                   "gathered": partial(gathered, x, downs, ups, torch.tensor([i % MIXED for i in range(batch)]))}
            torch.testing.assert_close(fns["grouped"]().float(), fns["gathered"]().float(), rtol=2e-2, atol=2e-2)
            times = microseconds(fns, repeats)
            rows.append({"rank": rank, "batch": batch, "adapters": len({id(a) for a in assigned}), **times})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=24,
                        help="tokens each row generates per run (at least 3: the decode steps timed are 2 fewer)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each configuration takes; its best is reported")
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="the tiny checkpoint, 8 new tokens, 1 round: checks that every part runs")
    args = parser.parse_args()
    if args.new_tokens < 3:
        parser.error("--new-tokens must be at least 3")
    if args.quick:
        args.new_tokens, args.rounds = 8, 1
    torch.set_num_threads(args.threads)
    shape = "tiny" if args.quick else "1.8b"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_model(shape, torch.bfloat16, tmp, torch.device("cpu"))
        base_bytes = nbytes(model)
        adapters = load_adapters(model, args.ranks, tmp)
    engine = Engine(model, QWenTokenizer(), max_batch_size=8, max_model_len=PROMPT_LEN + args.new_tokens + 8,
                    prefix_cache_bytes=0)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 150000, (8, PROMPT_LEN), generator=generator).tolist()
    rates = best_rates(configurations(engine, prompts, adapters), args.rounds, args.new_tokens)
    with torch.inference_mode():
        layers = layer_bench(model.config.hidden_size, args.ranks, repeats=20 if args.quick else 200)

    print(f"\nQwen-{shape} shape, random bf16 weights ({base_bytes / 2**30:.2f} GiB), {args.threads} threads, "
          f"{cpu_name()}; {PROMPT_LEN}-token prompts, {args.new_tokens} new tokens per row, best of {args.rounds} "
          f"rounds; load average {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.0f} s in all.\n")
    print("Decode tokens/s (all rows together):\n")
    print("| rows | rank | batch | decode tok/s | vs base at that batch |")
    print("|---|---:|---:|---:|---:|")
    for (what, batch, rank), rate in rates.items():
        print(f"| {what} | {rank or '-'} | {batch} | {rate:.2f} | {rate / rates['base', batch, None]:.3f}x |")
    print()
    for rank in args.ranks:
        cost = 1 - rates["1 adapter", 1, rank] / rates["base", 1, None]
        mixed = rates[f"{MIXED} adapters, mixed in one batch", 8, rank]
        serial = rates[f"{MIXED} adapters, one after another", 8, rank]
        print(f"- rank {rank}: one adapter costs {100 * cost:.1f}% of the base's batch-1 decode speed (goal <= 15%); "
              f"{MIXED} adapters mixed in one batch decode {mixed / serial:.2f}x as fast as one after another "
              "(goal > 1).")

    print("\nMemory per resident adapter (c_attn, c_proj, w1, w2 of every layer):\n")
    print("| rank | MiB | % of the base weights |")
    print("|---:|---:|---:|")
    for rank, loaded in adapters.items():
        print(f"| {rank} | {loaded[0].nbytes / 2**20:.2f} | {100 * loaded[0].nbytes / base_bytes:.2f}% |")

    hidden = model.config.hidden_size
    print(f"\nOne {hidden} -> {3 * hidden} layer (c_attn), microseconds per call (best of 5 bursts): the base layer, "
          "and its LoRA delta alone, grouped by adapter (qwen.lora) or gathered per row. Called over and over, the "
          "layer's weights stay in the CPU's caches: in a decode step the base layer reads them from memory.\n")
    print("| rank | batch | adapters | base layer µs | delta grouped µs | delta gathered µs | gathered / grouped |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in layers:
        print(f"| {row['rank']} | {row['batch']} | {row['adapters']} | {row['base']:.1f} | {row['grouped']:.1f} | "
              f"{row['gathered']:.1f} | {row['gathered'] / row['grouped']:.2f}x |")


if __name__ == "__main__":
    main()
