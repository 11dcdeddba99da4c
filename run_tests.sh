#!/usr/bin/env bash
# Run the whole test suite; bootstraps .venv with the [dev] extra on first use. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
bootstrap_venv dev || exit 1
# The approver-page test drives Debian's headless Chromium through chromedriver: installed once, as root, quietly.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "auditgate: installing chromium and chromium-driver for the browser test; log: $VENV/apt-chromium.log" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
            >"$VENV/apt-chromium.log" 2>&1 || echo "auditgate: installing chromium failed (see $VENV/apt-chromium.log)" >&2
    fi
fi
# The scale-out tests start a real PostgreSQL server from Debian's binaries and a real HAProxy in front of
# several gateways: installed once, as root, quietly (without them those tests skip, saying why).
missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "auditgate: installing ${missing[*]} for the scale-out tests; log: $VENV/apt-scale-out.log" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } \
        >"$VENV/apt-scale-out.log" 2>&1 || echo "auditgate: installing ${missing[*]} failed (see $VENV/apt-scale-out.log)" >&2
fi
# Two workers (pytest-xdist): most of the suite's time is real gateways starting and waiting on sockets,
# so two workers halve it on two cores. AUDITGATE_TEST_WORKERS=0 runs it in one process.
exec "$VENV/bin/python" -m pytest -n "${AUDITGATE_TEST_WORKERS:-2}" "$@"
