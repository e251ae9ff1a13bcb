"""Loading a checkpoint for the front ends (server, terminal and web chat), with their shared flags."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags every front end takes."""
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="weights dtype (auto: the checkpoint's bf16/fp16 flags, else bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--int8", action="store_true", help="int8 weight-only Linear layers (faster on CPU)")
    parser.add_argument("--kv-cache-int8", action="store_true", help="store the KV cache as int8 (~4x less than fp32)")
    parser.add_argument("--window-attn", metavar="MIN:MAX",
                        help="window attention, windows growing from MIN (lowest layer) to MAX tokens (highest)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for PyTorch (default: PyTorch's, one per physical core; fewer leaves "
                             "cores to other work, more than the physical cores slows decoding)")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def parse_window(spec: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--window-attn takes MIN:MAX token counts, e.g. 1024:8192, not {spec!r}") from None
    return low, high


def load_model(path: str | Path, args: argparse.Namespace):
    """Model (eval mode) and tokenizer from a checkpoint folder, as the flags of ``add_model_args`` ask."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    import qwen  # noqa: F401  (registers the Qwen classes)
    from qwen.config import window_schedule
    from qwen.quantize import quantize_int8_

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {}
    if args.kv_cache_int8:
        overrides["use_cache_quantization"] = True
    if args.window_attn:
        low, high = parse_window(args.window_attn)
        layers = AutoConfig.from_pretrained(path).num_hidden_layers
        overrides.update(use_window_attn=True, window_size=window_schedule(layers, low, high))
    device_map = "cpu" if args.cpu_only or not torch.cuda.is_available() else "auto"
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=dtype, **overrides).eval()
    if args.int8:
        quantize_int8_(model)
    return model, tokenizer
