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

"$PYTHON" "$FINETUNE" \
  --model_name_or_path "$MODEL" \
  --data_path "$DATA" \
  "${DEVICE_ARGS[@]}" \
  --output_dir output_qwen \
  --num_train_epochs 5 \
  --per_device_train_batch_size 2 \
  --per_device_eval_batch_size 1 \
  --gradient_accumulation_steps 8 \
  --eval_strategy "no" \
  --save_strategy "steps" \
  --save_steps 1000 \
  --save_total_limit 10 \
  --learning_rate 3e-4 \
  --weight_decay 0.1 \
  --adam_beta2 0.95 \
  --warmup_ratio 0.01 \
  --lr_scheduler_type "cosine" \
  --logging_steps 1 \
  --report_to "none" \
  --model_max_length 512 \
  --lazy_preprocess True \
  --gradient_checkpointing True \
  --use_lora \
  "${EXTRA_ARGS[@]}"

# If you use fp16 instead of bf16, use DeepSpeed: --fp16 True --deepspeed finetune/ds_config_zero2.json
