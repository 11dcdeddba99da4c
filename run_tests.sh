#!/usr/bin/env bash
# Run the whole test suite; bootstraps .venv with the [dev] extra on first use. Arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/bootstrap.sh
bootstrap_venv dev || exit 1
exec "$VENV/bin/python" -m pytest "$@"
