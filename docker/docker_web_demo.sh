#!/usr/bin/env bash
# Start the browser chat (web_demo.py) in a background container: the image (pulled when it is not
# here), the checkpoint folder mounted read-only, the port published; prints how to follow and stop it.
set -euo pipefail

KIND=web
NAME=qwen-web
DEFAULT_PORT=7860  # web_demo.py's own default (gradio's), so it never meets the API server on 8000
usage() {
    cat <<'USAGE'
Usage: bash docker/docker_web_demo.sh [-i IMAGE] (-c CHECKPOINT | --demo) [--port PORT] [options] [-- web_demo.py flags]

Start the web demo (web_demo.py, gradio) in a background container.

  -i, --image IMAGE     image (default: $QWEN_IMAGE or qwen:cpu; build it with docker/build.sh);
                        pulled when it is not here
  -c, --checkpoint DIR  original Qwen v1 checkpoint folder, mounted read-only
  --demo                a tiny random model made inside the container (no checkpoint; random replies)
  --port PORT           host port (default: 7860)
  --listen ADDR         host address to publish on (default: 127.0.0.1; 0.0.0.0 for the network)
  --int8                int8 weight-only Linear layers (faster on CPU)
  --lora DIR            chat with a LoRA adapter folder (finetune output) on the checkpoint, unmerged
  --cpu-only            no GPU, even if one is present
  --gpus SPEC           GPUs for docker run --gpus (default: all, when Docker has the NVIDIA runtime)
  -n, --name NAME       container name (default: qwen-web)
  --pull                pull the image even if it is here
  -h, --help            this help
  Anything after -- goes to web_demo.py (e.g. -- --dtype bfloat16).

Environment: DOCKER (docker client, default docker), QWEN_IMAGE (default image).
USAGE
}
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

prepare port "$@"


# gradio has no /health: the image's health check asks for the page itself.
run_server -e QWEN_HEALTH_URL=http://127.0.0.1:8000/
echo "Started the web demo (model: $MODEL_NAME) in container $CONTAINER: open http://$HOST:$PORT once it is loaded."
echo "See its logs:        docker logs -f $CONTAINER"
echo "Stop and remove it:  docker rm -f $CONTAINER"
