"""``python -m qwen.export {qwen2,gguf} SRC DST``: the command line of qwen.export.

Errors a user can fix (a folder that is not Qwen, a missing shard, an existing DST, a full disk) end the
program with one line that names the problem and the fix, and no traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..entry_points import program_name
from .gguf_file import OUTTYPES, export_gguf
from .qwen2 import DTYPES, export_qwen2
from .rope import DEFAULT_ROPE_SCALING, ROPE_SCALINGS
from .source import ExportError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name("python -m qwen.export"),
                                     description="Export an original Qwen v1 checkpoint folder for other runtimes.")
    sub = parser.add_subparsers(dest="format", required=True)
    q = sub.add_parser("qwen2", help="a Qwen2ForCausalLM folder (transformers, vLLM, SGLang) without remote code")
    q.add_argument("src", help="the original Qwen v1 folder (plain or GPTQ)")
    q.add_argument("dst", help="the folder to write")
    q.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="weights dtype (auto: the source's; a GPTQ source's is fp16)")
    q.add_argument("--shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    q.add_argument("--rope-scaling", choices=ROPE_SCALINGS,
                   help=f"rotary scaling past seq_length (default: {DEFAULT_ROPE_SCALING}, whose logits drift least "
                        f"from qwen's dynamic NTK + logn; none for models without dynamic NTK, e.g. 72B)")
    q.add_argument("--rope-factor", type=float, help="the scaling factor (dynamic: 2, yarn: 4)")
    q.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    g = sub.add_parser("gguf", help="one GGUF file for llama.cpp")
    g.add_argument("src", help="the original Qwen v1 folder (plain or GPTQ)")
    g.add_argument("dst", help="the .gguf file to write")
    g.add_argument("--outtype", choices=OUTTYPES, default="bf16", help="type of the matrices (default bf16)")
    g.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        if args.format == "qwen2":
            report = export_qwen2(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                                  rope=args.rope_scaling, rope_factor=args.rope_factor, overwrite=args.overwrite)
            notes = report.notes
            if args.rope_scaling is None:
                notes = [n + " [the default for this model; --rope-scaling changes it]"
                         if n.startswith("rope scaling") else n for n in notes]
        else:
            notes = export_gguf(args.src, args.dst, outtype=args.outtype, overwrite=args.overwrite).notes
    except ExportError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: {args.dst} was left as it was")
    print(f"wrote {args.dst}")
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
