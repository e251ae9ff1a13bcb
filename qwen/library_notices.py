"""Notices that the fine-tuning libraries print on every run although nothing is wrong: removed at their
cause where qwen can, dropped by their exact content where it cannot.

:func:`quiet_fine_tuning_notices` runs when :mod:`qwen.finetune` is imported, before transformers' Trainer
or peft import bitsandbytes and DeepSpeed. Anything else those libraries log still shows.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable

HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
NO_ACCELERATOR_NOTICE = "Setting accelerator to CPU."
_ABSENT = object()


class _Drop(logging.Filter):
    """Drops the log records for which ``matches`` is true."""

    def __init__(self, matches: Callable[[logging.LogRecord], bool]) -> None:
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


def _kernels_package_missing(record: logging.LogRecord) -> bool:
    """bitsandbytes' notice that it could not import ``kernels``; any other reason it gives still shows."""
    error = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return (str(record.msg).startswith(HUB_KERNEL_NOTICE)
            and isinstance(error, ModuleNotFoundError) and error.name == "kernels")


def _no_accelerator(record: logging.LogRecord) -> bool:
    """DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
    it.", logged when it finds no GPU: on a CPU machine that is the expected outcome, and fine-tuning says
    itself that it runs on the CPU."""
    return str(record.msg).startswith(NO_ACCELERATOR_NOTICE)


def _trainer_accumulates_itself(record: logging.LogRecord) -> bool:
    """accelerate's "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config
    has N. Using DeepSpeed's value." (after a rank prefix), logged on every DeepSpeed run that accumulates:
    transformers' Trainer always gives accelerate 1 (it counts the steps itself), and N is the value asked for."""
    return "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1," in str(record.msg)


def import_bitsandbytes_without_hub_kernels() -> None:
    """Import bitsandbytes (if installed) so that it keeps the 4-bit CPU kernel it ships.

    bitsandbytes 0.50, imported on a CPU with AVX512-BF16, asks the Hugging Face Hub for a faster 4-bit
    kernel through the ``kernels`` package, which transformers 5.25 installs: a network round trip at
    import, a binary from the Hub run in this process when it works, and a warning when it does not (no
    network, or "could not verify publisher trust status"). qwen runs no code from the Hub, so ``kernels``
    is hidden while bitsandbytes is imported; bitsandbytes then says it could not import ``kernels`` and
    uses its own kernel, and that one notice is dropped.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop(_kernels_package_missing))
    if "bitsandbytes" in sys.modules or importlib.util.find_spec("bitsandbytes") is None:
        return
    hidden = sys.modules.pop("kernels", _ABSENT)
    sys.modules["kernels"] = None  # makes `import kernels` raise ModuleNotFoundError(name="kernels")
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install: transformers reports it when Q-LoRA needs it
        pass
    finally:
        del sys.modules["kernels"]
        if hidden is not _ABSENT:
            sys.modules["kernels"] = hidden


def quiet_fine_tuning_notices() -> None:
    import_bitsandbytes_without_hub_kernels()
    # DeepSpeed calls torch.distributed functions that torch 2.13 renamed, with a FutureWarning at every call
    # (several per step with more than one process); only DeepSpeed can act on it.
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_Drop(_no_accelerator))
    logging.getLogger("accelerate.accelerator").addFilter(_Drop(_trainer_accumulates_itself))
