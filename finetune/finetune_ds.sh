#!/bin/bash
# Full-parameter fine-tuning on one or more GPUs and nodes with DeepSpeed ZeRO-3 (the original
# finetune_ds.sh). Several nodes: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on each. Without a
# GPU it runs one process on the CPU in fp32 (DeepSpeed included).
# Usage: bash finetune/finetune_ds.sh -m MODEL -d DATA [finetune.py flags]
set -e
export CUDA_DEVICE_MAX_CONNECTIONS=1
SCRIPT_NAME=finetune_ds.sh
MODEL="Qwen/Qwen-7B" # Set the path if you do not want to load from huggingface directly
DATA="path_to_data"
DS_CONFIG_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ds_config_zero3.json"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
deepspeed_args "$DS_CONFIG_PATH"

train_args 3 1 16 1e-5
"$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" "$FINETUNE" "${TRAIN_ARGS[@]}" "${DS_ARGS[@]}" "${EXTRA_ARGS[@]}"
