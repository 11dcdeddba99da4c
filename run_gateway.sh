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

# Defaults, each unless the caller set it (mitmproxy refuses an option given twice):
# the CA lives in certs/, and the proxy listens on loopback port 8080 only: never an open relay.
given=" $* "
defaults=()
[[ "$given" == *" confdir="* ]] || defaults+=(--set confdir=certs)
[[ "$given" == *"listen_host="* || "$given" == *" --listen-host "* ]] || defaults+=(--set listen_host=127.0.0.1)
[[ "$given" == *"listen_port="* || "$given" == *" -p "* || "$given" == *" --listen-port "* ]] || defaults+=(--listen-port 8080)

exec "$VENV/bin/$tool" "${defaults[@]}" -s addons/gateway.py "$@"
