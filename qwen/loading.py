"""Loading a checkpoint for the front ends (server, terminal and web chat), with their shared flags."""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DEMO_NAME = "tiny-random-qwen"  # what --demo calls its model (its folder lives in a temporary directory)


class CheckpointNotFoundError(FileNotFoundError):
    """A checkpoint path that is not a checkpoint folder; the message names it and what is close."""


def checkpoint_folder(path: str | Path) -> Path:
    """``path`` (``~`` expanded) as a checkpoint folder, or :class:`CheckpointNotFoundError` at once.

    The front ends (and :func:`load_model`) take local folders only. Checking here, before transformers
    sees the path, matters because transformers reads a missing ``name`` or ``org/name`` as a Hugging Face
    Hub id and, without a network, retries the Hub for about 45 s per file before failing; and a missing
    ``./name`` fails with "Repo id must use alphanumeric chars", which does not say the folder is missing.
    """
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return folder
    if folder.is_dir():
        message = f"{str(path)!r} is a folder without config.json, so not a Qwen checkpoint folder."
    else:
        where = "" if str(path) == str(folder.absolute()) else f" (looked for {folder.absolute()})"
        message = f"checkpoint folder {str(path)!r} does not exist{where}."
        parent = folder.absolute().parent
        siblings = [c.name for c in parent.iterdir() if c.is_dir()] if parent.is_dir() else []
        near = difflib.get_close_matches(folder.name, siblings, n=3)
        if near:
            message += f" Did you mean {' or '.join(repr(str(folder.parent / n)) for n in near)}?"
        elif str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):  # a Hub id: org/name
            message += f" Download a Hub model first: hf download {path} --local-dir {folder.name}"
    raise CheckpointNotFoundError(message)


@contextmanager
def front_end_checkpoint(args: argparse.Namespace) -> Iterator[tuple[Path, bool]]:
    """``(folder, is_demo)`` for a front end's ``-c``/``--demo`` flags: the ``-c`` folder, checked at once
    (a bad one ends the program with a one-line error), or with ``--demo`` or no ``-c`` a tiny random
    checkpoint named ``DEMO_NAME`` in a temporary directory that is removed afterwards."""
    try:
        path = checkpoint_folder(args.checkpoint_path) if args.checkpoint_path else None
    except CheckpointNotFoundError as exc:
        sys.exit(f"error: {exc} Without a checkpoint, --demo chats with a tiny random model.")
    if path is not None and not args.demo:
        yield path, False
        return
    from qwen.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="qwen-demo-") as temp:
        yield make_tiny_checkpoint(Path(temp) / DEMO_NAME), True


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model flags every front end takes."""
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto",
                        help="weights dtype (auto: the checkpoint's bf16/fp16/fp32 flag; else bf16 on a GPU and with "
                             "--int8/--int4; on a CPU the stored dtype for fp32 weights, else bf16 on CPUs with "
                             "AVX-512 BF16 or AMX, fp32 on others). With --int8/--int4 on a CPU it is the activations' "
                             "dtype: float32 quantizes the stored weights, then runs the rest in fp32 (llama.cpp's "
                             "precision; docs/quantization.md: Which quantization to use when)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--int8", action="store_true", help="int8 weight-only Linear layers (faster on CPU)")
    quant.add_argument("--int4", action="store_true",
                       help="4-bit weight-only Linear layers (the fastest decoding, CPU or GPU): blocks of 32 as "
                            "llama.cpp's Q4_0 on AVX-512 CPUs, else groups of 128; a GPTQ int4 folder keeps its own "
                            "4-bit weights")
    parser.add_argument("--int4-lm-head", choices=["auto", "int8", "int4", "keep"], default="auto",
                        help="with --int4, the lm_head's form: int8 is close to lossless at half of bf16's bytes, keep "
                             "leaves it 16-bit (auto: int8 on the CPU, keep on a GPU)")
    parser.add_argument("--kv-cache-int8", action="store_true", help="store the KV cache as int8 (~4x less than fp32)")
    parser.add_argument("--window-attn", metavar="MIN:MAX",
                        help="window attention, windows growing from MIN (lowest layer) to MAX tokens (highest)")
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for PyTorch (default: PyTorch's, one per physical core; fewer leaves "
                             "cores to other work, more than the physical cores slows decoding)")
    guess = parser.add_mutually_exclusive_group()
    guess.add_argument("--speculative", choices=["ngram"],
                       help="decode speculatively, with the same replies: ngram checks tokens guessed from n-grams "
                            "of the prompt and reply (prompt lookup) in one forward, faster where replies copy "
                            "their input (summaries, document QA, code edits; docs/speculative.md)")
    guess.add_argument("--draft-model", metavar="DIR",
                       help="decode speculatively, with the same replies, a smaller Qwen v1 checkpoint guessing "
                            "(same vocabulary: Qwen-1.8B(-Chat) for 7B/14B/72B), or this checkpoint again with "
                            "--draft-quant int4")
    parser.add_argument("--draft-quant", choices=["none", "int8", "int4"], default="none",
                        help="with --draft-model, its weights' form (int4: a cheap draft from the model's own "
                             "weights; default: %(default)s, the dtype of the model)")
    parser.add_argument("--num-speculative-tokens", type=positive_int, default=4, metavar="K",
                        help="with --speculative or --draft-model, the most tokens guessed per step "
                             "(default: %(default)s)")


def engine_settings(args: argparse.Namespace) -> dict:
    """The ``Engine`` keywords the flags of ``add_model_args`` ask for (loading ``--draft-model``; ValueError
    naming it when it cannot be loaded)."""
    draft = args.speculative
    if args.draft_model:
        flags = {**vars(args), "int8": args.draft_quant == "int8", "int4": args.draft_quant == "int4",
                 "kv_cache_int8": False, "window_attn": None}
        try:
            draft, _ = load_model(args.draft_model, argparse.Namespace(**flags))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--draft-model {args.draft_model}: {exc}") from None
    return {"draft": draft, "num_speculative_tokens": args.num_speculative_tokens}


def add_lora_arg(parser: argparse.ArgumentParser) -> None:
    """``--lora DIR`` of the chat apps and eval scripts (one adapter on every request); read it with
    :func:`load_lora_arg`. The server's ``--lora NAME=DIR`` serves several under names instead."""
    parser.add_argument("--lora", metavar="DIR",
                        help="run with a LoRA adapter folder (finetune.py --use_lora's output) on the checkpoint, "
                             "unmerged: a Q-LoRA adapter runs on the 4-bit base it was trained on")


def load_lora_arg(model, args: argparse.Namespace):
    """The adapter ``--lora DIR`` names, loaded onto ``model`` (None without the flag); a folder that cannot serve on
    this model ends the program with a one-line error that says why."""
    if not args.lora:
        return None
    from .lora import AdapterError, load_lora

    try:
        return load_lora(model, args.lora)
    except AdapterError as exc:
        sys.exit(f"error: --lora {args.lora}: {exc}")


def add_prefix_cache_arg(parser: argparse.ArgumentParser) -> None:
    """``--prefix-cache-gb``, taken by the server and the eval scripts; read it with :func:`prefix_cache_bytes`."""
    from .prefix_cache import PREFIX_CACHE_BYTES

    parser.add_argument("--prefix-cache-gb", type=non_negative_float, default=PREFIX_CACHE_BYTES / 2**30,
                        help="memory for keys and values of earlier prompts and replies, reused by requests that "
                             "start with them (chat history, tools prompts, few-shot examples); 0 turns it off "
                             "(default: %(default)g)")


def prefix_cache_bytes(args: argparse.Namespace) -> int:
    return int(args.prefix_cache_gb * 2**30)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, not {text!r}")
    return value


def parse_window(spec: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--window-attn takes MIN:MAX token counts, e.g. 1024:8192, not {spec!r}") from None
    return low, high


def stored_dtype(folder: Path):
    """The dtype of the folder's first floating-point tensor in its safetensors files, or None (no safetensors
    files: a legacy ``.bin`` folder)."""
    import torch
    from safetensors import safe_open

    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if (dtype := dtypes.get(f.get_slice(key).get_dtype())) is not None:
                    return dtype
    return None


def auto_dtype(config, stored, on_cpu: bool, quantized: bool):
    """``--dtype auto``: None (the model's own choice) where the folder's bf16/fp16/fp32 flag says, or on a GPU (the
    original's choice, bf16 where supported). On a CPU: bf16 for ``--int8``/``--int4`` (quantized from the stored
    weights without an fp32 model on the way, which would take twice a bf16 folder's memory); fp32 for weights
    stored in fp32 (their own precision); else (the released folders are bf16) bf16 where the CPU multiplies it in
    hardware (AVX-512 BF16 or AMX: faster, and half the memory), fp32 where bf16 arithmetic is emulated."""
    import torch

    if config.flag_dtype() is not None or not on_cpu:
        return None
    if quantized:
        return torch.bfloat16
    if stored == torch.float32:
        return torch.float32
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native else torch.float32


def load_model(path: str | Path, args: argparse.Namespace):
    """Model (eval mode) and tokenizer from a checkpoint folder, as the flags of ``add_model_args`` ask."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qwen import register_auto_classes
    from qwen.config import window_schedule
    from qwen.quantization import cast_unquantized_, find_gptq_config, quantize_int4_, quantize_int8_

    path = checkpoint_folder(path)
    register_auto_classes()  # a front end that deferred `import qwen`'s imports (see qwen/__init__.py)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(path)
    overrides = {}
    if args.kv_cache_int8:
        overrides["use_cache_quantization"] = True
    if args.window_attn:
        low, high = parse_window(args.window_attn)
        overrides.update(use_window_attn=True, window_size=window_schedule(config.num_hidden_layers, low, high))
    device_map = "cpu" if args.cpu_only or not torch.cuda.is_available() else "auto"
    on_cpu, quantized = device_map == "cpu", args.int8 or args.int4
    stored = stored_dtype(path) if args.dtype == "auto" or (on_cpu and quantized) else None  # read once
    compute = auto_dtype(config, stored, on_cpu, quantized) if args.dtype == "auto" else getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    gptq = find_gptq_config(path) is not None
    if args.int4 and gptq:
        overrides["gptq_backend"] = "int4"
    # fp32 activations for quantized layers on a CPU: quantize the stored 16-bit weights, never an fp32 copy of them
    dtype = compute
    if on_cpu and quantized and not gptq and compute == torch.float32 and stored in (torch.bfloat16, torch.float16):
        dtype = stored
    model = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=dtype, **overrides).eval()
    if model.device.type == "cuda" and not (args.int4 and gptq):
        model.fuse_weights_()  # one matmul for w1 and w2: 5% less GPU time per decode step on an H200
    if args.int8:
        quantize_int8_(model)
    if args.int4:  # a GPTQ folder's blocks are int4 already: only its lm_head changes
        auto = "int8" if model.device.type == "cpu" else "keep"
        quantize_int4_(model, lm_head=auto if args.int4_lm_head == "auto" else args.int4_lm_head)
    if compute != dtype:
        cast_unquantized_(model, compute)
    return model, tokenizer
