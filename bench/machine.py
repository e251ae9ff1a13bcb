"""The machine a figure was measured on, for the benches to print beside their tables."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name (e.g. "Intel(R) Xeon(R) Processor" or "AMD EPYC 9R45"), as /proc/cpuinfo says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def amx_settings() -> str:
    """Whether each side may use AMX here: qwen's bf16 kernel (``QWEN_BF16_AMX``) and oneDNN, PyTorch's matmul
    (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` holds it to AVX-512 BF16, as on a CPU without AMX)."""
    if not torch.cpu._is_amx_tile_supported():
        return "no AMX on this CPU"
    ours = "off (QWEN_BF16_AMX=0)" if os.environ.get("QWEN_BF16_AMX", "1") == "0" else "on"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"AMX: qwen's bf16 kernel {ours}, oneDNN {f'held to {cap}' if cap else 'on'}"
