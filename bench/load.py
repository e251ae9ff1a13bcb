"""Load time and peak memory of ``AutoModelForCausalLM.from_pretrained`` on a Qwen-1.8B-shape checkpoint.

    python bench/load.py [--dir PATH] [--repeats 1] [--keep]

A random checkpoint with the released 1.8B shapes (hidden 2048, 24 layers, 16 heads, intermediate
11008, vocab 151936; bf16 safetensors, about 3.7 GB) is written with ``qwen.tiny.make_tiny_checkpoint``
into ``--dir`` (reused when it already holds that shape) or a temporary folder (deleted afterwards
unless ``--keep``; the checkpoint is written by a child process, so this process stays small).
Each measurement runs in a fresh Python process that imports torch, transformers and qwen, records
its RSS, then loads the folder with ``dtype=torch.bfloat16``. Reported:

* load time: wall clock of ``from_pretrained`` (time.perf_counter);
* touch time: reading one element of every 4 KiB page of every parameter afterwards. transformers
  maps safetensors files into memory and, when dtype and device already match, the parameters *are*
  the mapped file pages: ``from_pretrained`` then returns before reading the data, and the first
  forward pass pays for it. "load + touch" is the figure comparable to a loader that copies;
* peak RSS: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` minus the RSS after the imports (the
  baseline), after the load and after the touch;
* weight bytes: the sizes of the ``*.safetensors`` files on disk.

Two scenarios: "cold" evicts the files from the page cache first (``posix_fadvise(DONTNEED)`` on the
checkpoint files only; needs no privileges), "warm" loads right after. Then the front ends' loader
(``qwen.loading.load_model``, what ``openai_api.py`` and the others run) with ``--int8`` and with ``--int4``,
``--dtype auto``, on the same folder, whose ``bf16``/``fp16``/``fp32`` flags are all false as in the released
folders: the weights are quantized from bf16, layer by layer, so the peak should stay near the bf16 weights'
size (quantizing from an fp32 copy of the model took twice that before the whole quantized model existed).
The target is peak RSS <= 1.3x the weight bytes (a loader that copies every tensor once more, or keeps
an fp32 copy, lands at 2x or more). Note: ru_maxrss survives exec on Linux, so a child forked from a big
process inherits its peak; that is why this parent never imports torch or holds weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(layers=24, hidden=2048, heads=16, intermediate=11008, vocab=151936)
TARGET_RATIO = 1.3

CHILD = r"""
import json, resource, sys, time

def rss_now(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

import torch
import transformers
from transformers import AutoModelForCausalLM
import qwen  # noqa: F401  (registers the Auto classes)

transformers.utils.logging.disable_progress_bar()
baseline = rss_now()
baseline_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t0 = time.perf_counter()
if len(sys.argv) > 2:  # the front ends' loader with these flags
    import argparse
    from qwen.loading import add_model_args, load_model
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    model = load_model(sys.argv[1], parser.parse_args(sys.argv[2:]))[0]
else:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
load_s = time.perf_counter() - t0
peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
after_load = rss_now()
params = [t for t in (*model.parameters(), *model.buffers()) if t.numel()]
t0 = time.perf_counter()
with torch.no_grad():
    for p in params:  # one element per 4 KiB page: pages become resident, nothing is copied
        p.detach().reshape(-1)[:: 4096 // p.element_size()].float().sum()
touch_s = time.perf_counter() - t0
print(json.dumps({
    "load_s": load_s,
    "touch_s": touch_s,
    "baseline": baseline,
    "baseline_peak": baseline_peak,
    "peak_load": peak_load,
    "after_load": after_load,
    "peak_touch": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "anon": rss_now("RssAnon"),
    "param_bytes": sum(p.numel() * p.element_size() for p in params),
    "dtypes": sorted({str(p.dtype) for p in params}),
    "class": type(model).__name__,
}))
"""


def checkpoint_matches(path: Path) -> bool:
    config_file = path / "config.json"
    if not config_file.is_file() or not list(path.glob("*.safetensors")):
        return False
    config = json.loads(config_file.read_text())
    want = {
        "num_hidden_layers": SHAPE["layers"],
        "hidden_size": SHAPE["hidden"],
        "num_attention_heads": SHAPE["heads"],
        "intermediate_size": SHAPE["intermediate"],
        "vocab_size": SHAPE["vocab"],
        "bf16": False,  # as released: the weights are bf16, no dtype flag is set
    }
    return all(config.get(k) == v for k, v in want.items())


def build(path: Path) -> float:
    """Write the checkpoint from a child process (keeps this process, and so its children's
    inherited ru_maxrss, small)."""
    code = (
        "import json, sys, torch; from pathlib import Path; from qwen.tiny import make_tiny_checkpoint; "
        f"folder = make_tiny_checkpoint(sys.argv[1], dtype=torch.bfloat16, **{SHAPE!r}); "
        "config = json.loads((folder / 'config.json').read_text()); "
        "(folder / 'config.json').write_text(json.dumps({**config, 'bf16': False}, indent=2))"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - t0


def evict(path: Path) -> None:
    """Drop the checkpoint files (only them) from the page cache."""
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(path: Path, cold: bool, flags: tuple[str, ...] = ()) -> dict:
    """One load in a fresh process: ``from_pretrained`` in bf16, or the front ends' loader with ``flags``."""
    if cold:
        evict(path)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), *flags],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"loading in the child process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def report(path: Path, weight_bytes: int, repeats: int) -> float:
    """Measure both scenarios, print the markdown table, return the worst peak/weight ratio."""
    rows = [
        (scenario, [measure(path, cold) for _ in range(repeats)])
        for scenario, cold in (("cold", True), ("warm", False))
    ]
    first = rows[0][1][0]
    print()
    print(
        f"{first['class']}, parameters {', '.join(first['dtypes'])} ({gib(first['param_bytes'])}); "
        f"weights on disk {gib(weight_bytes)} ({weight_bytes:,} B); RSS after imports "
        f"{gib(first['baseline'])}; {repeats} fresh process(es) per scenario, best time shown."
    )
    print()
    print(
        "| page cache | from_pretrained | load + touch all weights | peak RSS added by load | "
        "peak RSS added after touch | peak / weight bytes |"
    )
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for scenario, runs in rows:
        load_s = min(r["load_s"] for r in runs)
        total_s = min(r["load_s"] + r["touch_s"] for r in runs)
        peak_load = max(r["peak_load"] - r["baseline"] for r in runs)
        peak_touch = max(r["peak_touch"] - r["baseline"] for r in runs)
        ratio = peak_touch / weight_bytes
        worst = max(worst, ratio)
        print(
            f"| {scenario} | {load_s:.2f} s | {total_s:.2f} s | {gib(peak_load)} | {gib(peak_touch)} | {ratio:.2f}x |"
        )
    for _, runs in rows:
        for r in runs:
            if r["baseline_peak"] > 1.2 * r["baseline"]:
                print(f"\nwarning: a child started with an inherited ru_maxrss of {gib(r['baseline_peak'])}")
    print()
    verdict = "met" if worst <= TARGET_RATIO else "NOT met"
    print(f"Target peak RSS <= {TARGET_RATIO}x weight bytes: {verdict} (worst {worst:.2f}x).")

    print("\nThe front ends' loader (`load_model`, `--dtype auto`), warm page cache:\n")
    print("| flags | loaded as | load + quantize | weights in memory | peak RSS added | peak / bf16 weight bytes | "
          "anonymous memory at the end |")
    print("|---|---|---|---|---|---|---|")
    for flags in (("--int8",), ("--int4",)):
        r = measure(path, cold=False, flags=flags)
        ratio = (r["peak_touch"] - r["baseline"]) / weight_bytes
        worst = max(worst, ratio)
        print(f"| `{' '.join(flags)}` | {', '.join(r['dtypes'])} | {r['load_s']:.1f} s | {gib(r['param_bytes'])} | "
              f"{gib(r['peak_touch'] - r['baseline'])} | {ratio:.2f}x | {gib(r['anon'])} |")
    print("\nThe peak counts the folder's pages that quantizing read: mapped from the safetensors files, clean, so the "
          "kernel drops them under memory pressure; anonymous memory (what cannot be dropped) is the last column.")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="checkpoint folder to write or reuse (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=1, help="fresh-process loads per scenario")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="qwen-load-bench-")) if args.dir is None else None
    path = tmp / "qwen-1.8b-random" if tmp is not None else args.dir
    try:
        if checkpoint_matches(path):
            print(f"reusing the checkpoint in {path}")
        else:
            print(f"writing a random Qwen-1.8B-shape bf16 checkpoint to {path} ...", flush=True)
            print(f"  written in {build(path):.1f} s", flush=True)
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        report(path, weight_bytes, max(1, args.repeats))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            print(f"\nkept the checkpoint in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
