"""The machine a figure was measured on, for the benches to print beside their tables."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (e.g. "Intel(R) Xeon(R) Processor" or "AMD EPYC 9R45"), as /proc/cpuinfo says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
