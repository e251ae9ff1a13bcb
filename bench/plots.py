"""Charts for the documentation, drawn from the benches' JSON results (``--json FILE`` on a bench).

    python bench/plots.py                        # docs/data/*.json -> docs/img/<bench>.png
    python bench/plots.py results.json --out /tmp/charts

One chart per results file, by the bench that wrote it:

- ``llamacpp``: ours against llama.cpp per precision (decode at batch 1 and 8, a 512-token prompt), KL from
  each side's own bf16 in the labels;
- ``generate``: batch-1 decode against the bandwidth ceiling it implies, and decode tokens/s against batch size,
  per runner;
- ``serve``: server throughput and time to first token against concurrent clients.

Each chart's caption names the machine, the date and the commit the figures come from.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"llama.cpp": "#7f7f7f", "qwen": "#1f77b4"}


def caption(record: dict) -> str:
    machine = record["machine"]
    where = machine["gpu"] or f"{machine['cpu']}, {machine['threads']} threads"
    return f"{where}; torch {record['torch']}; {record['date']}, commit {record['commit']}: {record['command']}"


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    width = 0.8 / len(series)
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name, color=COLORS.get(name))
        ax.bar_label(bars, fmt=lambda v: f"{v:,.0f}" if v >= 100 else f"{v:.3g}", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)


def plot_llamacpp(record: dict):
    rows = record["tables"]["formats"]
    formats = list(dict.fromkeys(r["format"] for r in rows))
    side = {(r["format"], "qwen" if r["runner"].startswith("qwen") else "llama.cpp"): r for r in rows}
    figures = [k for k in ("decode b1 tok/s", "decode b8 tok/s", "prompt 512 tok/s") if k in rows[0]]
    fig, axes = plt.subplots(1, len(figures), figsize=(4.2 * len(figures), 4))

    def label(fmt: str) -> str:
        kl = [side[(fmt, s)].get("KL vs its bf16") for s in ("llama.cpp", "qwen")]
        return fmt if None in kl else f"{fmt}\nKL {kl[0]:.2g}\nKL {kl[1]:.2g}"

    for ax, figure in zip(axes, figures, strict=True):
        grouped_bars(ax, [label(f) for f in formats],
                     {s: [side[(f, s)][figure] for f in formats] for s in ("llama.cpp", "qwen")}, figure)
        ax.set_title(figure.replace(" tok/s", ""))
    axes[0].legend()
    fig.suptitle(f"qwen vs llama.cpp, {record['notes'].get('shape', '')} shape (under each format: llama.cpp's KL "
                 "from its bf16, then qwen's)")
    return fig


def plot_generate(record: dict):
    tables = record["tables"]
    fig, axes = plt.subplots(len(tables), 2, figsize=(12, 4 * len(tables)), squeeze=False)
    for (name, rows), (left, right) in zip(tables.items(), axes, strict=True):
        runners = [r["runner"] for r in rows]
        # The read ceiling (a streaming read's bandwidth over the bytes a step reads); a copy also writes, so its
        # "ceiling" is no bound on a decode step, which only reads.
        ceilings = {k: [r[k] for r in rows] for k in rows[0] if k == "read ceiling tok/s"}
        grouped_bars(left, runners, {"decode b1 tok/s": [r["decode b1 tok/s"] for r in rows],
                                     **{k.replace(" tok/s", ""): v for k, v in ceilings.items()}}, "tokens/s")
        left.set_title(f"{name}: batch-1 decode against the bandwidth ceiling")
        batches = sorted(int(k[len("decode b"):-len(" tok/s")]) for k in rows[0] if k.startswith("decode b"))
        for r in rows:
            right.plot(batches, [r[f"decode b{n} tok/s"] for n in batches], marker="o", label=r["runner"])
        right.set_xscale("log", base=2)
        right.set_xticks(batches, [str(n) for n in batches])
        right.set(xlabel="sequences decoded together", ylabel="tokens/s", title=f"{name}: decode against batch size")
        left.tick_params(axis="x", labelrotation=20, labelsize=7)
        for ax in (left, right):
            ax.legend(fontsize=7)
    return fig


def plot_serve(record: dict):
    rows = record["tables"]["servers"]
    fig, (tput, ttft) = plt.subplots(1, 2, figsize=(11, 4))
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == server]
        clients = [r["clients"] for r in mine]
        tput.plot(clients, [r["tokens/s"] for r in mine], marker="o", label=server)
        ttft.plot(clients, [r["TTFT p50 ms"] for r in mine], marker="o", label=f"{server} p50")
        ttft.plot(clients, [r["TTFT p95 ms"] for r in mine], marker="x", linestyle="--", label=f"{server} p95")
    tput.set(xlabel="concurrent clients", ylabel="completion tokens/s", title="server throughput")
    ttft.set(xlabel="concurrent clients", ylabel="ms", title="time to first token")
    levels = sorted({r["clients"] for r in rows})
    for ax in (tput, ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.legend(fontsize=7)
    return fig


PLOTS = {"llamacpp": plot_llamacpp, "generate": plot_generate, "serve": plot_serve}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", type=Path, help="results files (default: docs/data/*.json)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="folder for the PNGs (default: %(default)s)")
    args = p.parse_args(argv)
    files = args.results or sorted((ROOT / "docs" / "data").glob("*.json"))
    if not files:
        print("error: no results files (run a bench with --json FILE, or pass files)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for path in files:
        record = json.loads(path.read_text())
        draw = PLOTS.get(record.get("bench"))
        if draw is None:
            print(f"skipped {path}: no chart for bench {record.get('bench')!r}", file=sys.stderr)
            continue
        fig = draw(record)
        fig.text(0.01, 0.005, caption(record), fontsize=6, color="#555555")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        target = args.out / f"{path.stem}.png"
        fig.savefig(target, dpi=110)
        plt.close(fig)
        print(f"{path} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
