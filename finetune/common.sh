# Shared by the finetune_*.sh scripts (sourced, not run). Before sourcing, a script sets MODEL, DATA,
# SCRIPT_NAME and optionally DS_CONFIG_PATH; afterwards it has:
#   MODEL, DATA           from -m/--model and -d/--data
#   EXTRA_ARGS            every other argument, passed through to finetune.py after the script's
#                         defaults (a later flag overrides an earlier one: --max_steps 10, --output_dir ...)
#   GPUS_PER_NODE         detected with torch (0 = no GPU: CPU mode), or taken from the environment
#   NNODES NODE_RANK MASTER_ADDR MASTER_PORT   for torchrun, from the environment (defaults: one node)
#   DISTRIBUTED_ARGS      torchrun's arguments
#   DEVICE_ARGS           --bf16 True (GPU) or --use_cpu True (CPU, fp32)
#   ON_CPU                1 when no GPU is used
#   FINETUNE              path of finetune.py;  PYTHON: the interpreter (env PYTHON, default python)
# and the functions deepspeed_args CONFIG, which sets DS_ARGS, and train_args, which sets TRAIN_ARGS.

FINETUNE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FINETUNE="$FINETUNE_DIR/finetune.py"
PYTHON=${PYTHON:-python}

function usage() {
    echo "
Usage: bash finetune/$SCRIPT_NAME [-m MODEL_PATH] [-d DATA_PATH] [finetune.py flags ...]

  -m, --model   checkpoint folder or hub id (default: $MODEL)
  -d, --data    training data: JSON list of {\"id\", \"conversations\": [{\"from\", \"value\"}, ...]}
  Any other argument goes to finetune.py after this script's defaults and overrides them,
  e.g. --output_dir out --max_steps 100 --eval_data_path dev.json.
  Environment: NNODES NODE_RANK MASTER_ADDR MASTER_PORT (several nodes), GPUS_PER_NODE (default: all
  visible GPUs; 0 = CPU), PYTHON (interpreter), USE_DEEPSPEED=0 (run without DeepSpeed).
"
}

EXTRA_ARGS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        -m | --model )
            [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            MODEL=$2; shift 2 ;;
        -d | --data )
            [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; exit 2; }
            DATA=$2; shift 2 ;;
        -h | --help )
            usage; exit 0 ;;
        * )
            EXTRA_ARGS+=("$1"); shift ;;
    esac
done

if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    GPUS_PER_NODE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) || {
        echo "error: '$PYTHON' cannot import torch; activate the environment or set PYTHON" >&2; exit 2; }
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6001}

if [[ "$GPUS_PER_NODE" -eq 0 ]]; then
    ON_CPU=1
    GPUS_PER_NODE=1
    DEVICE_ARGS=(--use_cpu True)
    # One thread per physical core, as accelerate would choose, said here so that it does not warn that it chose.
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        OMP_NUM_THREADS=$("$PYTHON" -c 'import os, psutil; print(psutil.cpu_count(logical=False) or os.cpu_count())' \
                          2>/dev/null) || OMP_NUM_THREADS=$(nproc)
        export OMP_NUM_THREADS
    fi
    echo "note: no GPU found: training on the CPU in fp32 (--use_cpu True, one process per node)." \
         "Fine for tiny models and tests, far too slow for real ones." >&2
else
    ON_CPU=0
    DEVICE_ARGS=(--bf16 True)
fi
DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

# Q-LoRA on a GPTQ (-Int4) checkpoint computes in fp16, as the original; NF4 Q-LoRA uses bf16.
function qlora_precision() {
    if [[ "$ON_CPU" -eq 0 ]] && grep -qs '"quantization_config"' "$MODEL/config.json"; then
        DEVICE_ARGS=(--fp16 True)
    fi
}

# DS_ARGS=(--deepspeed CONFIG), or nothing with USE_DEEPSPEED=0, or on a CPU without DeepSpeed installed.
function deepspeed_args() {
    DS_ARGS=()
    if [[ "${USE_DEEPSPEED:-1}" == "0" ]]; then
        echo "note: USE_DEEPSPEED=0: training without DeepSpeed." >&2
        return
    fi
    if ! "$PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("deepspeed") is None)'; then
        if [[ "$ON_CPU" -eq 1 ]]; then
            echo "note: DeepSpeed is not installed: training without it (pip install 'qwen[finetune]')." >&2
            return
        fi
        echo "error: DeepSpeed is not installed: pip install 'qwen[finetune]' (or USE_DEEPSPEED=0)." >&2
        exit 2
    fi
    DS_ARGS=(--deepspeed "$1")
    if [[ "$ON_CPU" -eq 1 ]]; then
        echo "note: DeepSpeed runs on the CPU too; its first run compiles two CPU ops (about a minute," \
             "cached under ~/.cache/torch_extensions). USE_DEEPSPEED=0 skips it." >&2
    fi
}

# TRAIN_ARGS: model, data, device and the original scripts' hyperparameters, of which only
# epochs, per-device batch size, gradient accumulation and learning rate differ between them.
# Call after qlora_precision, which may change DEVICE_ARGS.
function train_args() {  # EPOCHS BATCH_SIZE GRADIENT_ACCUMULATION LEARNING_RATE
    TRAIN_ARGS=(--model_name_or_path "$MODEL" --data_path "$DATA" "${DEVICE_ARGS[@]}"
        --output_dir output_qwen --num_train_epochs "$1" --per_device_train_batch_size "$2"
        --per_device_eval_batch_size 1 --gradient_accumulation_steps "$3"
        --eval_strategy "no" --save_strategy "steps" --save_steps 1000 --save_total_limit 10
        --learning_rate "$4" --weight_decay 0.1 --adam_beta2 0.95 --warmup_ratio 0.01
        --lr_scheduler_type "cosine" --logging_steps 1 --report_to "none"
        --model_max_length 512 --lazy_preprocess True --gradient_checkpointing True)
}
