"""Merge a LoRA adapter into its base model and save a complete checkpoint folder.

    python finetune/merge_lora.py ADAPTER_DIR OUT_DIR [--max-shard-size 2GB] [--base BASE_DIR]

The output holds safetensors shards, the tokenizer and the generation config, and loads with
``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` after ``import qwen``. Q-LoRA adapters of a GPTQ
(-Int4) model cannot be merged into 4-bit weights: pass --base with the unquantized model instead.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from qwen.finetune import FinetuneError, merge_lora  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter_dir", help="output folder of finetune.py --use_lora")
    parser.add_argument("out_dir", help="folder to write the merged model to")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (default 2GB)")
    parser.add_argument("--base", help="base model folder (default: the one recorded in adapter_config.json)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="dtype to merge and save in (default: the base checkpoint's)")
    args = parser.parse_args(argv)
    try:
        out = merge_lora(args.adapter_dir, args.out_dir, args.base, args.max_shard_size, args.dtype)
    except FinetuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print(f"merged model saved to {out}")


if __name__ == "__main__":
    main()
