#!/usr/bin/env bash
# Fine-tune in a container with one of the finetune/*.sh recipes: the checkpoint and the data
# mounted read-only, the output folder writable and owned by the caller. In the foreground by
# default (the container is removed afterwards); --background prints how to follow and stop it.
set -euo pipefail

KIND=finetune
NAME=qwen-finetune
usage() {
    cat <<'USAGE'
Usage: bash docker/docker_finetune.sh [-i IMAGE] (-c CHECKPOINT -d DATA.json | --demo) [-o OUTPUT] [options] [-- finetune flags]

Fine-tune in a container with a finetune/*.sh recipe (LoRA on one GPU by default; on the CPU when
there is no GPU, which only suits tiny models).

  -i, --image IMAGE     image (default: $QWEN_IMAGE or qwen:cpu; build it with docker/build.sh);
                        pulled when it is not here
  -c, --checkpoint DIR  original Qwen v1 checkpoint folder, mounted read-only
  -d, --data FILE       training data: a JSON list of {"id", "conversations": [{"from", "value"}, ...]}
  -o, --output DIR      where the results go (default: ./output_qwen; created if missing)
  --script NAME         recipe in finetune/ (default: finetune_lora_single_gpu.sh; also finetune_ds.sh,
                        finetune_lora_ds.sh, finetune_qlora_ds.sh, finetune_qlora_single_gpu.sh)
  --demo                a tiny random model made inside the container; without -d, the sample data
  --cpu-only            no GPU, even if one is present
  --gpus SPEC           GPUs for docker run --gpus (default: all, when Docker has the NVIDIA runtime),
                        e.g. '"device=0,1"' (the inner quotes are needed)
  -b, --background      run in a background container and print how to follow and stop it
  -n, --name NAME       container name (default: qwen-finetune)
  --pull                pull the image even if it is here
  -h, --help            this help
  Anything after -- goes to the recipe and so to finetune.py, overriding its defaults
  (e.g. -- --num_train_epochs 1 --max_steps 100 --model_max_length 1024).

Environment: DOCKER (docker client, default docker), QWEN_IMAGE (default image).
USAGE
}
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
[[ -n $DATA || $DEMO -eq 1 ]] || die "give the training data with -d FILE.json (or --demo for the sample data)"
require_docker
checkpoint_args
check_name

MOUNTS=()
ENV_ARGS=()
if [[ -n $DATA ]]; then
    [[ -f $DATA ]] || die "training data $DATA does not exist"
    data_dir=$(cd "$(dirname "$DATA")" && pwd -P)
    MOUNTS+=(--mount "type=bind,source=$data_dir,target=/data,readonly")
    ENV_ARGS+=(-e "QWEN_DATA=/data/$(basename "$DATA")")
fi
OUTPUT=${OUTPUT:-./output_qwen}
mkdir -p "$OUTPUT" || die "cannot create the output folder $OUTPUT"
OUTPUT=$(cd "$OUTPUT" && pwd -P)
[[ -w $OUTPUT ]] || die "the output folder $OUTPUT is not writable"
MOUNTS+=(--mount "type=bind,source=$OUTPUT,target=/output")

ensure_image
gpu_args
user_args

CMD=(finetune)
[[ $DEMO -eq 1 ]] && CMD+=(--demo)
[[ -n $SCRIPT ]] && CMD+=(--script "$SCRIPT")
# On the CPU the recipes train in fp32 with one process; GPUS_PER_NODE=0 makes them skip the GPU count.
[[ $CPU_ONLY -eq 1 ]] && ENV_ARGS+=(-e GPUS_PER_NODE=0)

# As the caller's uid (user_args), so that the results in OUTPUT are the caller's. Shared memory as
# the original's docker run.
RUN=(run --name "$CONTAINER" "${USER_ARGS[@]}" --shm-size 2g --no-healthcheck
     "${GPU_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${MOUNTS[@]}" "${ENV_ARGS[@]}")

if [[ $BACKGROUND -eq 1 ]]; then
    out=$("$DOCKER" "${RUN[@]}" -d "$IMAGE" "${CMD[@]}" "${APP_ARGS[@]}" 2>&1) || die "docker run failed: $out"
    echo "Started fine-tuning (model: $MODEL_NAME) in container $CONTAINER; results go to $OUTPUT"
    echo "See its logs:        docker logs -f $CONTAINER"
    echo "Stop and remove it:  docker rm -f $CONTAINER"
    exit 0
fi
echo "Fine-tuning (model: $MODEL_NAME) in container $CONTAINER; results go to $OUTPUT" >&2
echo "From another terminal: docker logs -f $CONTAINER, or stop it: docker rm -f $CONTAINER" >&2
exec "$DOCKER" "${RUN[@]}" --rm "$IMAGE" "${CMD[@]}" "${APP_ARGS[@]}"
