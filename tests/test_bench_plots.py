"""The documentation's charts come from the benches' own results: a real (short) ``bench/serve.py`` run writes its
JSON with where and when it ran, and ``bench/plots.py`` draws that file into a PNG whose caption names it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("matplotlib", reason="bench/plots.py needs matplotlib (the docs extra)")


def test_a_bench_run_becomes_a_chart(tmp_path):
    results = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, "bench/serve.py", "--clients", "1,2", "--min-requests", "2",
                           "--max-tokens", "8", "--json", str(results)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(results.read_text())
    assert record["bench"] == "serve" and record["machine"]["cpu"] and record["commit"]
    rows = record["tables"]["servers"]
    assert {r["clients"] for r in rows} == {1, 2} and len({r["server"] for r in rows}) == 2
    assert all(r["tokens/s"] > 0 and r["TTFT p50 ms"] <= r["TTFT p95 ms"] for r in rows)

    drawn = subprocess.run([sys.executable, "bench/plots.py", str(results), "--out", str(tmp_path / "img")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 0, drawn.stderr
    png = (tmp_path / "img" / "serve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # A file from a bench without a chart is named and skipped, not a crash.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**record, "bench": "quant"}))
    skipped = subprocess.run([sys.executable, "bench/plots.py", str(other), "--out", str(tmp_path / "img")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert skipped.returncode == 0 and "no chart for bench 'quant'" in skipped.stderr
