#!/bin/bash
# LoRA fine-tuning on one GPU (the original finetune_lora_single_gpu.sh). Without a GPU it runs on
# the CPU in fp32. Usage: bash finetune/finetune_lora_single_gpu.sh -m MODEL -d DATA [finetune.py flags]
set -e
export CUDA_DEVICE_MAX_CONNECTIONS=1
SCRIPT_NAME=finetune_lora_single_gpu.sh
MODEL="Qwen/Qwen-7B" # Set the path if you do not want to load from huggingface directly
DATA="path_to_data"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

train_args 5 2 8 3e-4
"$PYTHON" "$FINETUNE" "${TRAIN_ARGS[@]}" --use_lora "${EXTRA_ARGS[@]}"

# If you use fp16 instead of bf16, use DeepSpeed: --fp16 True --deepspeed finetune/ds_config_zero2.json
