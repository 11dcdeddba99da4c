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
exec "$VENV/bin/python" -m pytest "$@"
