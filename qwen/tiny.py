"""Write a tiny random-weight Qwen v1 checkpoint folder in the exact original layout.

    python -m qwen.tiny OUT_DIR [--layers 2 --hidden 64 --heads 4 --intermediate 128 ...]

The folder looks like a real Qwen-*-Chat download: config.json with ``auto_map`` and
``seq_length``, safetensors (or legacy ``.bin``) with the original key names, optionally sharded,
generation_config.json, tokenizer_config.json and qwen.tiktoken. It also carries stand-ins for the
original remote-code files that raise when imported, which proves the loaders never execute them.
Tests, demos and benchmarks all use it; the weights are written from the original key/shape table,
independently of this package's model classes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from .chat import BASE_GENERATION_DEFAULTS, CHAT_GENERATION_DEFAULTS
from .entry_points import program_name
from .tokenizer import BUNDLED_VOCAB, VOCAB_FILE

REMOTE_CODE_FILES = (
    "configuration_qwen.py",
    "modeling_qwen.py",
    "tokenization_qwen.py",
    "qwen_generation_utils.py",
    "cpp_kernels.py",
)
# A random model hardly ever says <|im_end|>, so replies run to max_new_tokens: the real checkpoints' 512
# would make the README's chat snippet take minutes on a tiny one.
TINY_MAX_NEW_TOKENS = 32
REMOTE_CODE_STUB = (
    "raise ImportError('This stand-in for the original Qwen remote code was executed: '\n"
    "                  'the qwen package must never run a checkpoint folder\\'s own code.')\n"
)

def original_config(
    layers: int, hidden: int, heads: int, intermediate: int, vocab: int, seq_length: int, **overrides
) -> dict:
    """config.json as the original checkpoints write it (remote-code auto_map included)."""
    config = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "kv_channels": hidden // heads,
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": seq_length,
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": seq_length,
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": vocab,
    }
    config.update(overrides)
    return config


def weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The original state-dict keys and shapes (only c_attn has a bias; lm_head is untied)."""
    h, v, half = config["hidden_size"], config["vocab_size"], config["intermediate_size"] // 2
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (h,),
            p + "attn.c_attn.weight": (3 * h, h),
            p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h),
            p + "ln_2.weight": (h,),
            p + "mlp.w1.weight": (half, h),
            p + "mlp.w2.weight": (half, h),
            p + "mlp.c_proj.weight": (h, half),
        })
    shapes["transformer.ln_f.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def random_weights(config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    std = config["initializer_range"]
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        weights[name] = t.to(dtype)
    return weights


def save_weights(weights: dict[str, torch.Tensor], out: Path, shards: int, legacy_bin: bool) -> None:
    """Write one file or ``shards`` files plus the index, in safetensors or the legacy .bin format."""
    from safetensors.torch import save_file

    names = list(weights)
    groups = [names[i::shards] for i in range(shards)] if shards > 1 else [names]
    stem, ext = ("pytorch_model", "bin") if legacy_bin else ("model", "safetensors")
    weight_map = {}
    for n, group in enumerate(groups, 1):
        fname = f"{stem}.{ext}" if len(groups) == 1 else f"{stem}-{n:05d}-of-{len(groups):05d}.{ext}"
        part = {k: weights[k].contiguous() for k in group}
        if legacy_bin:
            torch.save(part, out / fname)
        else:
            save_file(part, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 128,
    vocab: int = 151936,
    seq_length: int = 8192,
    chat: bool = True,
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    legacy_bin: bool = False,
    remote_code_stubs: bool = True,
    seed: int = 0,
    max_new_tokens: int = TINY_MAX_NEW_TOKENS,
    **config_overrides,
) -> Path:
    """Create the folder and return its path. ``config_overrides`` go into config.json as given."""
    if vocab < 151851:
        raise ValueError(f"vocab must be at least 151851 (the tokenizer's size), got {vocab}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = original_config(layers, hidden, heads, intermediate, vocab, seq_length, **config_overrides)
    if dtype == torch.bfloat16:
        config["bf16"] = True
    elif dtype == torch.float16:
        config["fp16"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_weights(random_weights(config, seed, dtype), out, shards, legacy_bin)
    generation = {**(CHAT_GENERATION_DEFAULTS if chat else BASE_GENERATION_DEFAULTS), "max_new_tokens": max_new_tokens}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    tokenizer_config = {
        "model_max_length": seq_length,
        "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    shutil.copyfile(BUNDLED_VOCAB, out / VOCAB_FILE)
    if remote_code_stubs:
        for name in REMOTE_CODE_FILES:
            (out / name).write_text(REMOTE_CODE_STUB)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=program_name("python -m qwen.tiny"), description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=128, help="both MLP branches together (2x each)")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq-length", type=int, default=8192, help="training context (NTK/logn start here)")
    parser.add_argument("--base", action="store_true", help="base-model generation config (chat_format raw)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--shards", type=int, default=1, help="split the weights over this many files")
    parser.add_argument("--bin", action="store_true", help="legacy pytorch_model*.bin instead of safetensors")
    parser.add_argument("--no-remote-code-stubs", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=TINY_MAX_NEW_TOKENS,
                        help="default reply length in generation_config.json (real checkpoints: 512)")
    args = parser.parse_args(argv)
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} must be divisible by --heads {args.heads}")
    if args.intermediate % 2:
        parser.error("--intermediate must be even (each MLP branch is half of it)")
    if args.vocab < 151851:
        parser.error("--vocab must be at least 151851, the tokenizer's size")
    out = make_tiny_checkpoint(
        args.out_dir,
        layers=args.layers,
        hidden=args.hidden,
        heads=args.heads,
        intermediate=args.intermediate,
        vocab=args.vocab,
        seq_length=args.seq_length,
        chat=not args.base,
        dtype=getattr(torch, args.dtype),
        shards=args.shards,
        legacy_bin=args.bin,
        remote_code_stubs=not args.no_remote_code_stubs,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
    print(f"wrote a tiny random Qwen checkpoint to {out} (its replies are random text)")


if __name__ == "__main__":
    main()
