#!/usr/bin/env bash
# Build a minimal Debian image with python3 + venv from a Debian mirror, for machines that cannot
# pull from an image registry: debootstrap a root filesystem, then `docker import` it.
set -euo pipefail

usage() {
    cat <<'USAGE'
Usage: bash docker/make-local-base.sh TAG [--suite SUITE] [--mirror URL] [--keep-rootfs DIR]

Make a base image TAG for docker/build.sh (--base TAG) without an image registry:
debootstrap --variant=minbase SUITE (python3, python3-venv, ca-certificates) from a Debian mirror,
then `docker import`. Needs root, debootstrap and a running Docker daemon. About 40 s and 265 MB.

  TAG                 image name to create, e.g. qwen-base:bookworm
  --suite SUITE       Debian release (default: bookworm, whose python3 is 3.11)
  --mirror URL        Debian mirror (default: the first http(s) Debian URI in this machine's apt
                      sources, else http://deb.debian.org/debian)
  --keep-rootfs DIR   build the root filesystem in DIR and keep it (default: a temporary folder)
  -h, --help          this help

Environment: DOCKER  docker client to use (default: docker)
USAGE
}

die() { echo "error: $*" >&2; exit 1; }

# The mirror apt already uses here is the one known to be reachable; deb822 (.sources) and one-line
# (.list) formats are both read.
apt_mirror() {
    local file uri
    for file in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -r $file ]] || continue
        if [[ $file == *.sources ]]; then
            uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /debian\/?$/) { print $i; exit } }' "$file")
        else
            uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*debian\/?$/) { print $i; exit } }' "$file")
        fi
        if [[ -n $uri ]]; then
            echo "${uri%/}"
            return
        fi
    done
    echo "http://deb.debian.org/debian"
}

TAG=""
SUITE=bookworm
MIRROR=""
ROOTFS=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --suite) [[ $# -ge 2 ]] || die "$1 needs a value"; SUITE=$2; shift 2 ;;
        --mirror) [[ $# -ge 2 ]] || die "$1 needs a value"; MIRROR=$2; shift 2 ;;
        --keep-rootfs) [[ $# -ge 2 ]] || die "$1 needs a value"; ROOTFS=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $TAG ]] || die "one TAG only (got '$TAG' and '$1')"; TAG=$1; shift ;;
    esac
done
[[ -n $TAG ]] || { usage >&2; exit 2; }

DOCKER=${DOCKER:-docker}
command -v "$DOCKER" >/dev/null || die "'$DOCKER' not found: install Docker (Debian: apt-get install docker.io)"
command -v debootstrap >/dev/null || die "debootstrap not found (Debian: apt-get install debootstrap)"
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root: run this as root (sudo)"
"$DOCKER" info >/dev/null 2>&1 || die "cannot reach the Docker daemon: start it (systemctl start docker, or dockerd &)"
MIRROR=${MIRROR:-$(apt_mirror)}

if [[ -z $ROOTFS ]]; then
    ROOTFS=$(mktemp -d /tmp/qwen-rootfs.XXXXXX)
    trap 'rm -rf "$ROOTFS"' EXIT
fi
echo "debootstrap $SUITE from $MIRROR into $ROOTFS ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOTFS" "$MIRROR" \
    >"$ROOTFS.log" 2>&1 || { tail -20 "$ROOTFS.log" >&2; die "debootstrap failed (full log: $ROOTFS.log)"; }
rm -f "$ROOTFS.log"
# apt caches are not needed in an image.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | "$DOCKER" import \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "made base image $TAG ($("$DOCKER" image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1 / 1e6}'))"
