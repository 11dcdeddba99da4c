#!/usr/bin/env bash
# Run the auditgate gateway: mitmdump (or mitmweb with --web) with the whole addon bundle.
# Every argument is handed to mitmproxy: --mode reverse:https://api.openai.com, -p 9000, --set NAME=VALUE ...
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
bootstrap_venv || exit 1

tool=mitmdump
if [ "${1:-}" = "--web" ]; then
    tool=mitmweb
    shift
fi
# Defaults first so that the caller's arguments override them: loopback only, never an open relay.
exec "$VENV/bin/$tool" \
    --set confdir=certs \
    --set listen_host=127.0.0.1 \
    --listen-port 8080 \
    -s addons/gateway.py \
    "$@"
