#!/usr/bin/env bash
# Build the qwen image from docker/Dockerfile: CPU by default, CUDA with --cuda. It only picks
# build arguments, stages local wheels and passes pip's network settings as BuildKit secrets.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CPU_BASE=python:3.11-slim
CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

usage() {
    cat <<USAGE
Usage: bash docker/build.sh [-t TAG] [--base IMAGE] [--cuda] [options] [-- docker build flags]

Build the qwen image (API server by default; web/cli demos and fine-tuning inside too).

  -t, --tag TAG         image name (default: qwen:cpu, or qwen:cuda with --cuda)
  --base IMAGE          base image (default: $CPU_BASE; with --cuda: $CUDA_BASE)
  --cuda                CUDA image: torch from PyPI (its Linux build bundles CUDA), CUDA base image
  --flash-attn          also install flash-attn (CUDA only; may need a -devel base to compile)
  --torch VERSION       torch version to pin (default: 2.13.0, as CI)
  --torch-index URL     index to take torch from (default: $CPU_TORCH_INDEX for CPU,
                        PyPI for --cuda; '' = pip's own configuration)
  --wheels DIR          offer DIR's wheels to pip (linked into docker/wheels, mounted at build time
                        only); a torch VERSION wheel among them (+cpu for CPU) replaces the torch
                        index, for machines that cannot reach it. Repeatable.
  --pip-conf FILE       pip configuration for the build (a BuildKit secret: not kept in the image)
  --ca-cert FILE        CA bundle for pip, e.g. behind a TLS-inspecting proxy (a secret too)
  --no-compiler         leave out g++ and Python headers (smaller; qwen's int8 CPU kernel falls back
                        to PyTorch's, DeepSpeed CPU ops and Triton cannot compile)
  --uid UID             uid of the image's non-root user "qwen" (default: 1000)
  -h, --help            this help
  Anything after -- goes to docker build (e.g. --no-cache, --progress=plain).

Environment: DOCKER, the docker client to use (default: docker). BuildKit is needed: with docker
buildx installed it is used; otherwise a client older than 23 builds with DOCKER_BUILDKIT=1.

Examples:
  bash docker/build.sh                      # qwen:cpu on $CPU_BASE
  bash docker/build.sh --cuda               # qwen:cuda on $CUDA_BASE
  bash docker/make-local-base.sh qwen-base:bookworm && \\
  bash docker/build.sh -t qwen:cpu --base qwen-base:bookworm --wheels /opt/wheels \\
      --pip-conf ~/.config/pip/pip.conf --ca-cert /etc/ssl/certs/ca-certificates.crt
USAGE
}

die() { echo "error: $*" >&2; exit 1; }

TAG=""
BASE=""
CUDA=0
FLASH_ATTN=0
TORCH_VERSION=2.13.0
TORCH_INDEX=__default__
WHEEL_DIRS=()
PIP_CONF=""
CA_CERT=""
COMPILER=1
QWEN_UID=1000
EXTRA=()
need() { [[ $1 -ge 2 ]] || die "$2 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        -t | --tag) need $# "$1"; TAG=$2; shift 2 ;;
        --base) need $# "$1"; BASE=$2; shift 2 ;;
        --cuda) CUDA=1; shift ;;
        --flash-attn) FLASH_ATTN=1; shift ;;
        --torch) need $# "$1"; TORCH_VERSION=$2; shift 2 ;;
        --torch-index) need $# "$1"; TORCH_INDEX=$2; shift 2 ;;
        --wheels) need $# "$1"; WHEEL_DIRS+=("$2"); shift 2 ;;
        --pip-conf) need $# "$1"; PIP_CONF=$2; shift 2 ;;
        --ca-cert) need $# "$1"; CA_CERT=$2; shift 2 ;;
        --no-compiler) COMPILER=0; shift ;;
        --uid) need $# "$1"; QWEN_UID=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ $FLASH_ATTN -eq 0 || $CUDA -eq 1 ]] || die "--flash-attn needs --cuda (flash-attn does not build without CUDA)"
if [[ $CUDA -eq 1 ]]; then
    TAG=${TAG:-qwen:cuda}; BASE=${BASE:-$CUDA_BASE}
    [[ $TORCH_INDEX != __default__ ]] || TORCH_INDEX=""
    TORCH_WHEEL_GLOBS=("torch-$TORCH_VERSION-*.whl" "torch-$TORCH_VERSION+cu*.whl")
else
    TAG=${TAG:-qwen:cpu}; BASE=${BASE:-$CPU_BASE}
    [[ $TORCH_INDEX != __default__ ]] || TORCH_INDEX=$CPU_TORCH_INDEX
    TORCH_WHEEL_GLOBS=("torch-$TORCH_VERSION+cpu-*.whl")
fi
[[ -z $PIP_CONF || -f $PIP_CONF ]] || die "--pip-conf: no file $PIP_CONF"
[[ -z $CA_CERT || -f $CA_CERT ]] || die "--ca-cert: no file $CA_CERT"

DOCKER=${DOCKER:-docker}
command -v "$DOCKER" >/dev/null || die "'$DOCKER' not found: install Docker (https://docs.docker.com/engine/install/)"
"$DOCKER" info >/dev/null 2>&1 ||
    die "cannot reach the Docker daemon: is it running (systemctl start docker), and may you use it (docker group)?"

# BuildKit: buildx if present; else the classic client's built-in BuildKit, which clients from 23
# on no longer have (they refuse DOCKER_BUILDKIT=1 without buildx).
if "$DOCKER" buildx version >/dev/null 2>&1; then
    BUILD=("$DOCKER" buildx build --load)
else
    client=$("$DOCKER" version --format '{{.Client.Version}}' 2>/dev/null || echo 0)
    [[ ${client%%.*} =~ ^[0-9]+$ && ${client%%.*} -lt 23 ]] ||
        die "BuildKit is needed, and this docker client ($client) has no buildx: install the buildx plugin
(Debian/Ubuntu: docker-buildx or docker-buildx-plugin), or set DOCKER to a client older than 23
(e.g. DOCKER=/usr/bin/docker from Debian bookworm's docker.io)."
    export DOCKER_BUILDKIT=1
    BUILD=("$DOCKER" build)
fi

# Local wheels: hard links where possible (no copy of a 200 MB torch wheel), copies otherwise.
WHEELS=$ROOT/docker/wheels
mkdir -p "$WHEELS"
for dir in "${WHEEL_DIRS[@]}"; do
    [[ -d $dir ]] || die "--wheels: no folder $dir"
    shopt -s nullglob
    files=("$dir"/*.whl)
    shopt -u nullglob
    [[ ${#files[@]} -gt 0 ]] || die "--wheels: no .whl files in $dir"
    for file in "${files[@]}"; do
        target=$WHEELS/$(basename "$file")
        cmp -s "$file" "$target" 2>/dev/null || ln -f "$file" "$target" 2>/dev/null || cp -f "$file" "$target"
    done
done
TORCH_FROM_WHEELS=0
for pattern in "${TORCH_WHEEL_GLOBS[@]}"; do
    if wheel=$(compgen -G "$WHEELS/$pattern" | head -1) && [[ -n $wheel ]]; then
        TORCH_FROM_WHEELS=1
        echo "torch $TORCH_VERSION: from $(basename "$wheel") in docker/wheels"
        break
    fi
done

ARGS=(--file "$ROOT/docker/Dockerfile" --tag "$TAG"
      --build-arg "BASE=$BASE" --build-arg "TORCH_VERSION=$TORCH_VERSION"
      --build-arg "TORCH_INDEX_URL=$TORCH_INDEX" --build-arg "TORCH_FROM_WHEELS=$TORCH_FROM_WHEELS"
      --build-arg "FLASH_ATTN=$FLASH_ATTN" --build-arg "COMPILER=$COMPILER" --build-arg "QWEN_UID=$QWEN_UID")
[[ -z $PIP_CONF ]] || ARGS+=(--secret "id=pip_conf,src=$PIP_CONF")
[[ -z $CA_CERT ]] || ARGS+=(--secret "id=ca_cert,src=$CA_CERT")

echo "building $TAG on $BASE ($([[ $CUDA -eq 1 ]] && echo CUDA || echo CPU), torch $TORCH_VERSION) ..."
started=$SECONDS
"${BUILD[@]}" "${ARGS[@]}" "${EXTRA[@]}" "$ROOT"
echo "built $TAG in $((SECONDS - started)) s. Run it: bash docker/docker_openai_api.sh -i $TAG --demo"
