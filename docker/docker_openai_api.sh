#!/usr/bin/env bash
# Start the OpenAI-compatible API server in a background container: the image (pulled when it is
# not here), the checkpoint folder mounted read-only, the port published; prints how to follow
# and stop it.
set -euo pipefail

KIND=api
NAME=qwen-api
usage() {
    cat <<'USAGE'
Usage: bash docker/docker_openai_api.sh [-i IMAGE] (-c CHECKPOINT | --demo) [--port PORT] [options] [-- openai_api.py flags]

Start the OpenAI-compatible API server (openai_api.py) in a background container.

  -i, --image IMAGE     image (default: $QWEN_IMAGE or qwen:cpu; build it with docker/build.sh);
                        pulled when it is not here
  -c, --checkpoint DIR  original Qwen v1 checkpoint folder, mounted read-only; its name is the model id
  --demo                a tiny random model made inside the container (no checkpoint; random replies)
  --port PORT           host port (default: 8000)
  --listen ADDR         host address to publish on (default: 127.0.0.1; 0.0.0.0 for the network)
  --api-keys KEYS       comma-separated Bearer keys clients must send (passed in the environment)
  --int8                int8 weight-only Linear layers (faster on CPU)
  --lora NAME=DIR       serve a LoRA adapter folder (finetune output), mounted read-only, unmerged: requests
                        with model NAME use it (repeat for more; DIR alone names it after its folder)
  --cpu-only            no GPU, even if one is present
  --gpus SPEC           GPUs for docker run --gpus (default: all, when Docker has the NVIDIA runtime)
  -n, --name NAME       container name (default: qwen-api)
  --pull                pull the image even if it is here
  -h, --help            this help
  Anything after -- goes to openai_api.py (e.g. -- --max-batch-size 4 --dtype bfloat16).

Environment: DOCKER (docker client, default docker), QWEN_IMAGE (default image).
USAGE
}
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

prepare port "$@"

ENV_ARGS=()
if [[ -n $API_KEYS ]]; then
    export QWEN_API_KEYS=$API_KEYS  # -e NAME without a value: not visible in ps or docker's command line
    ENV_ARGS+=(-e QWEN_API_KEYS)
fi

run_server "${ENV_ARGS[@]}"
echo "Started the OpenAI-compatible API server (model: $MODEL_NAME) in container $CONTAINER: http://$HOST:$PORT/v1"
echo "It answers once the model is loaded: curl http://$HOST:$PORT/health (docker ps shows it as healthy)."
echo "See its logs:        docker logs -f $CONTAINER"
echo "Stop and remove it:  docker rm -f $CONTAINER"
