#!/bin/sh
# Build-time only (bind-mounted by the Dockerfile's RUN steps, never copied into the image): run
# `pip install` with the pip configuration and CA bundle that docker/build.sh passed as BuildKit
# secrets, when it passed them, and with the wheels staged in docker/wheels as extra links.
set -eu
if [ -s /run/secrets/pip_conf ]; then
    PIP_CONFIG_FILE=/run/secrets/pip_conf
    export PIP_CONFIG_FILE
fi
if [ -s /run/secrets/ca_cert ]; then
    PIP_CERT=/run/secrets/ca_cert
    SSL_CERT_FILE=/run/secrets/ca_cert
    export PIP_CERT SSL_CERT_FILE
fi
# PIP_FIND_LINKS beats a find-links in the mounted configuration, whose folders do not exist here.
PIP_FIND_LINKS=/tmp/wheels
export PIP_FIND_LINKS
exec pip install --no-cache-dir "$@"
