# Sourced by run_gateway.sh and run_tests.sh: find Python >= 3.12, create .venv, install the project.
# Usage: bootstrap_venv [EXTRA]   (EXTRA is a pyproject extra such as "dev"; empty for the gateway alone)
# Sets VENV to the virtualenv's path. Later calls skip the install unless pyproject.toml changed.

_ag_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_ag_python_ok() {
    "$1" -c 'import sys, venv; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    local candidate
    # 1. An explicit choice wins, but must be good enough.
    if [ -n "${PYTHON:-}" ]; then
        if _ag_python_ok "$PYTHON"; then echo "$PYTHON"; return 0; fi
        echo "auditgate: PYTHON=$PYTHON is not a working Python >= 3.12 with venv" >&2
        return 1
    fi
    # 2. Interpreters on PATH (a pyenv shim that is not installed fails the check and is skipped).
    for candidate in python3.13 python3.12 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && _ag_python_ok "$candidate"; then
            command -v "$candidate"; return 0
        fi
    done
    # 3. pyenv's versions folder, newest first.
    local root="${PYENV_ROOT:-$HOME/.pyenv}"
    if [ -d "$root/versions" ]; then
        for candidate in $(ls -1 "$root/versions" 2>/dev/null | sort -t. -k1,1nr -k2,2nr -k3,3nr); do
            if [ -x "$root/versions/$candidate/bin/python3" ] && _ag_python_ok "$root/versions/$candidate/bin/python3"; then
                echo "$root/versions/$candidate/bin/python3"; return 0
            fi
        done
    fi
    echo "auditgate: no Python >= 3.12 found. Tried \$PYTHON, python3.13, python3.12, python3 and ${root}/versions/*." >&2
    echo "auditgate: install one (e.g. 'pyenv install 3.12') or point PYTHON at it." >&2
    return 1
}

bootstrap_venv() {
    local extra="${1:-}"
    VENV="${AUDITGATE_VENV:-$_ag_root/.venv}"
    if [ ! -x "$VENV/bin/python" ] || ! _ag_python_ok "$VENV/bin/python"; then
        local py
        py="$(find_python)" || return 1
        echo "auditgate: creating $VENV with $py" >&2
        rm -rf "$VENV"
        "$py" -m venv "$VENV" || { echo "auditgate: could not create $VENV" >&2; return 1; }
    fi
    # The stamp records what was installed (pyproject digest and extras); a changed pyproject.toml
    # or a missing extra reinstalls, anything else starts straight away.
    local stamp="$VENV/.auditgate-installed" digest have
    # The checkout's path is part of it: the project is installed editable, so a venv used by another
    # checkout (AUDITGATE_VENV shared, a moved folder) must install this one.
    digest="$( { cat "$_ag_root/pyproject.toml"; echo "$_ag_root"; } | sha256sum | cut -d' ' -f1)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [ "${have%% *}" != "$digest" ] || { [ -n "$extra" ] && [[ " $have " != *" $extra "* ]]; }; then
        local log="$VENV/install.log" extras="$extra"
        # Keep extras installed earlier (tests then gateway must not drop the test tools).
        [ "${have%% *}" = "$digest" ] && extras="$(echo "${have#* } $extra" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
        extras="$(echo $extras)"
        echo "auditgate: installing the project into $VENV${extras:+ (extras: $extras)}; log: $log" >&2
        {
            "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip &&
            "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$_ag_root${extras:+[${extras// /,}]}"
        } >"$log" 2>&1 || { tail -n 30 "$log" >&2; echo "auditgate: installing the project failed (see $log)" >&2; return 1; }
        echo "$digest $extras" > "$stamp"
    fi
    export PATH="$VENV/bin:$PATH"
}
