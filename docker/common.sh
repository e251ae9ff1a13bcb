# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables set here are read by the scripts that source this
# Shared by docker_openai_api.sh, docker_web_demo.sh, docker_cli_demo.sh and docker_finetune.sh
# (sourced, not run). Before sourcing, a script sets KIND (api, web, cli or finetune), NAME (default
# container name) and the function usage; then it calls parse_args "$@" and the checks it needs.
# After parse_args:
#   IMAGE CHECKPOINT DEMO PORT LISTEN CONTAINER API_KEYS INT8 CPU_ONLY GPUS PULL LORAS
#   DATA OUTPUT SCRIPT BACKGROUND (finetune)   APP_ARGS (after --: to the program in the container)
# Everything else it defines: die, require_docker, ensure_image, gpu_args, checkpoint_args,
# lora_args, user_args, check_port, check_name, start_failed.

KIND=${KIND:?set KIND before sourcing common.sh}
NAME=${NAME:?set NAME before sourcing common.sh}
DOCKER=${DOCKER:-docker}
IMAGE=${QWEN_IMAGE:-qwen:cpu}
CHECKPOINT=""
DEMO=0
PORT=${DEFAULT_PORT:-8000}  # the host port; the web script sets 7860, as web_demo.py
LISTEN=127.0.0.1
CONTAINER=$NAME
API_KEYS=""
INT8=0
CPU_ONLY=0
GPUS=""
PULL=0
DATA=""
OUTPUT=""
SCRIPT=""
BACKGROUND=0
LORAS=()  # --lora values: NAME=DIR (api) or DIR (web, cli)
APP_ARGS=()

die() { echo "error: $*" >&2; exit 1; }

# The flags every script knows; a flag another KIND has is refused with a one-line error.
parse_args() {
    local flag
    while [[ $# -gt 0 ]]; do
        flag=$1
        case $flag in
            -i | --image | --image-name) _value "$@"; IMAGE=$2; shift 2 ;;
            -c | --checkpoint | --checkpoint-path) _value "$@"; CHECKPOINT=$2; shift 2 ;;
            -n | --name | --container-name) _value "$@"; CONTAINER=$2; shift 2 ;;
            --demo) DEMO=1; shift ;;
            --cpu-only) CPU_ONLY=1; shift ;;
            --gpus) _value "$@"; GPUS=$2; shift 2 ;;
            --pull) PULL=1; shift ;;
            --port) _only api web; _value "$@"; PORT=$2; shift 2 ;;
            --listen) _only api web; _value "$@"; LISTEN=$2; shift 2 ;;
            --api-keys) _only api; _value "$@"; API_KEYS=$2; shift 2 ;;
            --int8) _only api web cli; INT8=1; shift ;;
            --lora) _only api web cli; _value "$@"; LORAS+=("$2"); shift 2 ;;
            -d | --data) _only finetune; _value "$@"; DATA=$2; shift 2 ;;
            -o | --output) _only finetune; _value "$@"; OUTPUT=$2; shift 2 ;;
            --script) _only finetune; _value "$@"; SCRIPT=$2; shift 2 ;;
            -b | --background) _only finetune; BACKGROUND=1; shift ;;
            -h | --help) usage; exit 0 ;;
            --) shift; APP_ARGS=("$@"); break ;;
            *) die "unknown argument '$flag' (see --help; flags for the program itself go after --)" ;;
        esac
    done
    [[ $PORT =~ ^[0-9]+$ && $PORT -ge 1 && $PORT -le 65535 ]] || die "--port takes a number from 1 to 65535"
    [[ -n $CHECKPOINT || $DEMO -eq 1 ]] ||
        die "give a checkpoint folder with -c /path/to/Qwen-7B-Chat, or --demo for a tiny random model"
    [[ -z $CHECKPOINT || $DEMO -eq 0 ]] || die "-c and --demo exclude each other"
}
_value() { [[ $# -ge 2 && $2 != -* ]] || die "$1 needs a value (see --help)"; }
_only() {
    local kind
    for kind in "$@"; do [[ $KIND == "$kind" ]] && return; done
    die "$flag is not a flag of this script (see --help)"
}

# Docker is installed and its daemon answers.
require_docker() {
    command -v "$DOCKER" >/dev/null ||
        die "docker not found: install Docker (https://docs.docker.com/engine/install/; Debian: apt-get install docker.io)"
    local out
    if ! out=$("$DOCKER" info 2>&1 >/dev/null); then
        if [[ $out == *"permission denied"* ]]; then
            die "no permission to use the Docker daemon: add yourself to the docker group, or use sudo"
        fi
        die "cannot reach the Docker daemon (is it running? systemctl start docker): ${out##*$'\n'}"
    fi
}

# The image is here, or is pulled (--pull: always pulled).
ensure_image() {
    if [[ $PULL -eq 0 ]] && "$DOCKER" image inspect "$IMAGE" >/dev/null 2>&1; then
        return
    fi
    echo "pulling $IMAGE ..." >&2
    "$DOCKER" pull "$IMAGE" >&2 ||
        die "image $IMAGE is not here and cannot be pulled; build it: bash docker/build.sh -t $IMAGE"
}

# GPU_ARGS: docker's --gpus flag when wanted and possible. --cpu-only: none; --gpus SPEC: as given;
# else all GPUs when the daemon has the NVIDIA runtime (nvidia-container-toolkit).
gpu_args() {
    GPU_ARGS=()
    # shellcheck disable=SC2016  # a Go template for docker, not a shell expansion
    local runtimes='{{range $name, $_ := .Runtimes}}{{$name}} {{end}}'
    if [[ $CPU_ONLY -eq 1 ]]; then
        return
    elif [[ -n $GPUS ]]; then
        GPU_ARGS=(--gpus "$GPUS")
    elif "$DOCKER" info --format "$runtimes" 2>/dev/null | grep -qw nvidia; then
        GPU_ARGS=(--gpus all)
        echo "NVIDIA container runtime found: using all GPUs (--gpus SPEC or --cpu-only to change)" >&2
    fi
}

# CHECKPOINT_ARGS: the folder mounted read-only under /models by its own name, which the API server
# then reports as the model id (clients send "Qwen-7B-Chat", as with the original).
checkpoint_args() {
    CHECKPOINT_ARGS=()
    MODEL_NAME=tiny-random-qwen
    [[ -n $CHECKPOINT ]] || return 0
    [[ -d $CHECKPOINT ]] || die "checkpoint folder $CHECKPOINT does not exist"
    [[ -f $CHECKPOINT/config.json ]] || die "$CHECKPOINT has no config.json: not a Qwen checkpoint folder"
    local path unreadable
    path=$(cd "$CHECKPOINT" && pwd -P)
    # The container reads the files as the caller's uid (see user_args), or, when the caller is root,
    # as the image's user qwen (uid 1000), which needs them readable by all.
    if [[ $(id -u) -eq 0 && $KIND != finetune ]]; then
        unreadable=$(find "$path" -maxdepth 1 -type f ! -perm -o=r -print -quit)
        [[ -z $unreadable ]] || die "$unreadable is readable by its owner only, and the container runs as uid 1000:
make the checkpoint readable by all (chmod -R a+rX $path), or run this script as the files' owner"
    else
        unreadable=$(find "$path" -maxdepth 1 -type f ! -readable -print -quit)
        [[ -z $unreadable ]] || die "cannot read $unreadable"
    fi
    MODEL_NAME=$(basename "$path")
    CHECKPOINT_ARGS=(--mount "type=bind,source=$path,target=/models/$MODEL_NAME,readonly"
                     -e "QWEN_CHECKPOINT=/models/$MODEL_NAME")
}

# LORA_ARGS: each LoRA adapter folder mounted read-only under /adapters/NAME, and the program's --lora flag for it:
# NAME=/adapters/NAME for the API server (requests pick it with model NAME), the folder alone for the chat apps.
lora_args() {
    LORA_ARGS=()
    LORA_FLAGS=()
    [[ $KIND == api || ${#LORAS[@]} -le 1 ]] || die "the chat apps take one --lora (the API server serves several)"
    local spec name dir path
    for spec in "${LORAS[@]}"; do
        if [[ $KIND == api && $spec == *=* ]]; then
            name=${spec%%=*} dir=${spec#*=}
        else
            name="" dir=$spec
        fi
        [[ -d $dir ]] || die "LoRA adapter folder $dir does not exist"
        [[ -f $dir/adapter_config.json ]] || die "$dir has no adapter_config.json: not a LoRA adapter folder"
        path=$(cd "$dir" && pwd -P)
        name=${name:-$(basename "$path")}
        [[ $name =~ ^[A-Za-z0-9._-]+$ ]] || die "LoRA adapter name '$name' may hold only letters, digits, '.', '_' and '-'"
        LORA_ARGS+=(--mount "type=bind,source=$path,target=/adapters/$name,readonly")
        if [[ $KIND == api ]]; then
            LORA_FLAGS+=(--lora "$name=/adapters/$name")
        else
            LORA_FLAGS+=(--lora "/adapters/$name")
        fi
    done
}

# USER_ARGS: run as the caller's uid and gid, so that the container reads what the caller can read
# and writes files the caller owns; HOME in /tmp, as that uid has no home in the image (torch and
# DeepSpeed cache compiled code there). A root caller keeps the image's non-root user.
user_args() {
    USER_ARGS=()
    if [[ $(id -u) -ne 0 || $KIND == finetune ]]; then
        USER_ARGS=(--user "$(id -u):$(id -g)" -e HOME=/tmp)
    fi
}

# The host port is free: something answering on it, or a container publishing it, is an error
# now rather than a failed container later.
check_port() {
    local host=$LISTEN
    [[ $host == 0.0.0.0 || $host == "::" ]] && host=127.0.0.1
    if (exec 3<>"/dev/tcp/$host/$PORT") 2>/dev/null; then
        die "port $PORT is taken (something answers on $host:$PORT): choose another with --port"
    fi
    local user
    user=$("$DOCKER" ps --filter "publish=$PORT" --format '{{.Names}}' 2>/dev/null | head -1)
    [[ -z $user ]] || die "port $PORT is taken by container $user: choose another with --port"
}

# No container has the name already (docker run would refuse it less clearly).
check_name() {
    if "$DOCKER" container inspect "$CONTAINER" >/dev/null 2>&1; then
        die "a container named $CONTAINER exists: remove it (docker rm -f $CONTAINER) or pick another name with -n"
    fi
}

# After `docker run -d`: fail with the container's last words when it stopped or keeps restarting.
start_failed() {
    sleep 3
    local state
    state=$("$DOCKER" inspect --format '{{.State.Status}} {{.RestartCount}}' "$CONTAINER" 2>/dev/null || echo "gone 0")
    [[ $state == "running 0" ]] && return 1
    echo "error: container $CONTAINER did not stay up ($state); its log:" >&2
    "$DOCKER" logs --tail 20 "$CONTAINER" >&2 2>&1 || true
    echo "remove it with: docker rm -f $CONTAINER" >&2
    return 0
}

# Everything a script checks and prepares before `docker run`: the flags, docker, the checkpoint, the
# container name, the port (with "port" as first argument: the server and web scripts), the image,
# GPUs and the user to run as. Then CMD is the image's command for KIND with the model flags.
prepare() {
    local want_port=$1
    shift
    parse_args "$@"
    require_docker
    checkpoint_args
    lora_args
    check_name
    [[ $want_port == port ]] && check_port
    ensure_image
    gpu_args
    user_args
    CMD=("$KIND")
    [[ $DEMO -eq 1 ]] && CMD+=(--demo)
    [[ $INT8 -eq 1 ]] && CMD+=(--int8)
    [[ $CPU_ONLY -eq 1 ]] && CMD+=(--cpu-only)
    CMD+=("${LORA_FLAGS[@]}")
    return 0
}

# `docker run -d` of a server publishing PORT, with the given extra docker arguments; a taken port or
# a container that does not stay up ends the script with the reason.
run_server() {
    local out
    # --stop-timeout: docker stop sends SIGTERM, then waits this long for running requests to finish (the server
    # stops them after its --shutdown-timeout, 25 s) before it kills the container
    if ! out=$("$DOCKER" run -d --name "$CONTAINER" --restart unless-stopped --stop-timeout 30 \
            -p "$LISTEN:$PORT:8000" "$@" "${USER_ARGS[@]}" "${GPU_ARGS[@]}" "${CHECKPOINT_ARGS[@]}" "${LORA_ARGS[@]}" \
            "$IMAGE" "${CMD[@]}" "${APP_ARGS[@]}" 2>&1); then
        if [[ $out == *"already allocated"* || $out == *"address already in use"* ]]; then
            "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
            die "port $PORT is taken: choose another with --port"
        fi
        die "docker run failed: $out"
    fi
    if start_failed; then
        exit 1
    fi
    HOST=$LISTEN
    [[ $HOST == 0.0.0.0 ]] && HOST=localhost
    return 0
}
