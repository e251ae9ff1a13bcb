#!/usr/bin/env bash
# Entry point of the qwen image (installed as /usr/local/bin/qwen-entrypoint). `api`, `web`, `cli` and
# `finetune` start the toolkit's programs with the container's conventions, so that the run scripts
# and compose.yaml need no long command lines; any other command runs as given (bash, python ...).
set -euo pipefail

APP=/app
CHECKPOINT=${QWEN_CHECKPOINT:-/models/checkpoint}
PORT=${QWEN_PORT:-8000}

usage() {
    cat <<USAGE
Usage: docker run [docker options] IMAGE COMMAND [ARGS ...]

  api [--demo] [openai_api.py flags]   OpenAI-compatible API server on 0.0.0.0:\$QWEN_PORT (default)
  web [--demo] [web_demo.py flags]     browser chat on 0.0.0.0:\$QWEN_PORT
  cli [--demo] [cli_demo.py flags]     terminal chat (docker run -it)
  finetune [--demo] [--script NAME] [flags for finetune/NAME]
                                       fine-tune \$QWEN_CHECKPOINT on \$QWEN_DATA, writing \$QWEN_OUTPUT
                                       (NAME: one of finetune/*.sh, default finetune_lora_single_gpu.sh)
  help                                 this text
  anything else                        run as given, e.g. bash or python -m qwen.tiny /tmp/t

--demo uses a tiny random checkpoint made inside the container (its replies are random text).
Otherwise the checkpoint is -c FOLDER when given, else \$QWEN_CHECKPOINT (now: $CHECKPOINT), a
mounted original Qwen v1 folder (docker run -v /path/Qwen-7B-Chat:$CHECKPOINT:ro ...).
Environment: QWEN_PORT ($PORT), QWEN_MODEL_NAME (api: model id, default the folder's name),
QWEN_API_KEYS (api: comma-separated Bearer keys), QWEN_DATA, QWEN_OUTPUT (finetune).
USAGE
}

die() { echo "error: $*" >&2; exit 2; }

# The tiny random checkpoint --demo stands for, named like the one the terminal and web demos make.
make_demo_checkpoint() {
    local dir
    dir=$(mktemp -d /tmp/qwen-demo.XXXXXX)
    python -m qwen.tiny "$dir/tiny-random-qwen" >/dev/null
    echo "$dir/tiny-random-qwen"
}

# The mounted checkpoint, or a one-line explanation of how to give one.
mounted_checkpoint() {
    [[ -f $CHECKPOINT/config.json ]] && { echo "$CHECKPOINT"; return; }
    die "no checkpoint at $CHECKPOINT (no config.json there). Mount an original Qwen v1 folder:
  docker run -v /path/to/Qwen-7B-Chat:$CHECKPOINT:ro ... (or set QWEN_CHECKPOINT, or pass -c FOLDER),
or add --demo for a tiny random model."
}

# Sets DEMO (1 when --demo is among the arguments), HAS_CHECKPOINT (1 when -c is) and REST (the
# arguments without --demo).
split_args() {
    DEMO=0
    HAS_CHECKPOINT=0
    REST=()
    local arg
    for arg in "$@"; do
        case $arg in
            --demo) DEMO=1 ;;
            -c | --checkpoint-path | --checkpoint-path=*) HAS_CHECKPOINT=1; REST+=("$arg") ;;
            *) REST+=("$arg") ;;
        esac
    done
}

command=${1:-api}
[[ $# -gt 0 ]] && shift
case $command in
    api)
        split_args "$@"
        args=(--server-name 0.0.0.0 --server-port "$PORT")
        if [[ $DEMO -eq 1 ]]; then
            echo "Demo mode: a tiny checkpoint with RANDOM weights, so replies are random text." >&2
            args+=(-c "$(make_demo_checkpoint)")
        elif [[ $HAS_CHECKPOINT -eq 0 ]]; then
            args+=(-c "$(mounted_checkpoint)")
        fi
        [[ -n ${QWEN_MODEL_NAME:-} ]] && args+=(--model-name "$QWEN_MODEL_NAME")
        exec python "$APP/openai_api.py" "${args[@]}" "${REST[@]}"
        ;;
    web | cli)
        split_args "$@"
        args=()
        [[ $command == web ]] && args+=(--server-name 0.0.0.0 --server-port "$PORT")
        if [[ $DEMO -eq 1 ]]; then
            args+=(--demo)  # both front ends make their own tiny model
        elif [[ $HAS_CHECKPOINT -eq 0 ]]; then
            args+=(-c "$(mounted_checkpoint)")
        fi
        exec python "$APP/${command}_demo.py" "${args[@]}" "${REST[@]}"
        ;;
    finetune)
        script=finetune_lora_single_gpu.sh
        demo=0
        rest=()
        while [[ $# -gt 0 ]]; do
            case $1 in
                --demo) demo=1; shift ;;
                --script) [[ $# -ge 2 ]] || die "--script needs a value"; script=$2; shift 2 ;;
                *) rest+=("$1"); shift ;;
            esac
        done
        [[ $script =~ ^finetune_[a-z_]+\.sh$ && -f $APP/finetune/$script ]] ||
            die "no fine-tuning script '$script'; choose one of: $(cd "$APP/finetune" && echo finetune_*.sh)"
        if [[ $demo -eq 1 ]]; then
            model=$(make_demo_checkpoint)
            data=${QWEN_DATA:-$APP/finetune/sample_data.json}
        else
            model=$(mounted_checkpoint)
            data=${QWEN_DATA:-}
            [[ -n $data ]] || die "set QWEN_DATA to the training data (a JSON file) inside the container"
        fi
        [[ -f $data ]] || die "no training data at $data"
        output=${QWEN_OUTPUT:-/output}
        mkdir -p "$output"
        cd "$output"  # the scripts' relative paths (e.g. DeepSpeed's) land beside the results
        exec bash "$APP/finetune/$script" -m "$model" -d "$data" --output_dir "$output" "${rest[@]}"
        ;;
    help | -h | --help)
        usage
        ;;
    *)
        exec "$command" "$@"
        ;;
esac
