#!/bin/bash
# Q-LoRA on one GPU (the original finetune_qlora_single_gpu.sh, DeepSpeed ZeRO-2 in one process).
# MODEL is a GPTQ -Int4 checkpoint (needs the quant extra; computes in fp16, as the original) or any
# unquantized checkpoint, quantized at load time to bitsandbytes NF4 (bf16 compute). Without a GPU it
# runs on the CPU in fp32 (NF4 only).
# Usage: bash finetune/finetune_qlora_single_gpu.sh -m MODEL -d DATA [finetune.py flags]
set -e
export CUDA_DEVICE_MAX_CONNECTIONS=1
SCRIPT_NAME=finetune_qlora_single_gpu.sh
MODEL="Qwen/Qwen-7B-Chat-Int4" # Set the path if you do not want to load from huggingface directly
DATA="path_to_data"
DS_CONFIG_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
deepspeed_args "$DS_CONFIG_PATH"
qlora_precision
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}

train_args 5 2 8 3e-4
"$PYTHON" "$FINETUNE" "${TRAIN_ARGS[@]}" --use_lora --q_lora "${DS_ARGS[@]}" "${EXTRA_ARGS[@]}"
