"""Bench results as JSON, beside the markdown table each bench prints: what ``bench/plots.py`` draws.

A results file names the bench, the machine (CPU model, cores), torch, the date, the commit and the command line,
so a chart made from it can say where and when its figures were measured. ``--json FILE`` on a bench writes one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the results to FILE as JSON (python bench/plots.py FILE... draws charts)")


def _commit() -> str:
    """The checkout's commit, "+dirty" when tracked files differ from it (the figures then come from code that
    commit does not hold)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(path: Path | None, bench: str, tables: dict[str, list[dict[str, Any]]], **notes: Any) -> None:
    """Write ``tables`` (name -> rows, each row a dict of column -> value) to ``path`` with where and when they
    were measured; nothing when ``path`` is None."""
    if path is None:
        return
    import torch

    record = {
        "bench": bench,
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "commit": _commit(),
        "command": " ".join(["python", f"bench/{bench}.py", *sys.argv[1:]]),
        "notes": notes,
        "tables": tables,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=float) + "\n")
    print(f"results written to {path}", file=sys.stderr)
