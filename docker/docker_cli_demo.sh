#!/usr/bin/env bash
# Chat in the terminal (cli_demo.py) inside a container that is removed when the chat ends: the
# image (pulled when it is not here) and the checkpoint folder mounted read-only.
set -euo pipefail

KIND=cli
NAME=qwen-cli
usage() {
    cat <<'USAGE'
Usage: bash docker/docker_cli_demo.sh [-i IMAGE] (-c CHECKPOINT | --demo) [options] [-- cli_demo.py flags]

Chat with the model in this terminal (cli_demo.py); the container is removed afterwards.

  -i, --image IMAGE     image (default: $QWEN_IMAGE or qwen:cpu; build it with docker/build.sh);
                        pulled when it is not here
  -c, --checkpoint DIR  original Qwen v1 checkpoint folder, mounted read-only
  --demo                a tiny random model made inside the container (no checkpoint; random replies)
  --int8                int8 weight-only Linear layers (faster on CPU)
  --lora DIR            chat with a LoRA adapter folder (finetune output) on the checkpoint, unmerged
  --cpu-only            no GPU, even if one is present
  --gpus SPEC           GPUs for docker run --gpus (default: all, when Docker has the NVIDIA runtime)
  -n, --name NAME       container name (default: qwen-cli)
  --pull                pull the image even if it is here
  -h, --help            this help
  Anything after -- goes to cli_demo.py (e.g. -- --max-new-tokens 64 --system "...").

Environment: DOCKER (docker client, default docker), QWEN_IMAGE (default image).
USAGE
}
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

prepare no-port "$@"

TTY=(-i)
[[ -t 0 && -t 1 ]] && TTY=(-it)  # a terminal for the chat when there is one; piped input works too

echo "Starting the terminal chat (model: $MODEL_NAME) in container $CONTAINER; :exit or Ctrl-D ends it." >&2
echo "From another terminal: docker logs $CONTAINER, or stop it: docker rm -f $CONTAINER" >&2
exec "$DOCKER" run --rm "${TTY[@]}" --name "$CONTAINER" --no-healthcheck -e PROMPT_TOOLKIT_NO_CPR=1 \
    "${USER_ARGS[@]}" "${GPU_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LORA_ARGS[@]}" "$IMAGE" "${CMD[@]}" "${APP_ARGS[@]}"
