#!/bin/bash
# Q-LoRA on one or more GPUs and nodes with DeepSpeed ZeRO-2 (the original finetune_qlora_ds.sh).
# MODEL is a GPTQ -Int4 checkpoint (needs the quant extra; computes in fp16, as the original) or any
# unquantized checkpoint, quantized at load time to bitsandbytes NF4 (bf16 compute). Several nodes:
# set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on each. Without a GPU it runs one process on the
# CPU in fp32 (NF4 only).
# Usage: bash finetune/finetune_qlora_ds.sh -m MODEL -d DATA [finetune.py flags]
set -e
export CUDA_DEVICE_MAX_CONNECTIONS=1
SCRIPT_NAME=finetune_qlora_ds.sh
MODEL="Qwen/Qwen-7B-Chat-Int4" # Set the path if you do not want to load from huggingface directly
DATA="path_to_data"
DS_CONFIG_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
deepspeed_args "$DS_CONFIG_PATH"
qlora_precision

train_args 5 2 8 3e-4
"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" "$FINETUNE" "${TRAIN_ARGS[@]}" --use_lora --q_lora "${DS_ARGS[@]}" "${EXTRA_ARGS[@]}"
