#!/usr/bin/env bash
# vitforge launcher: sets up .venv on first use (and again whenever pyproject.toml changes),
# then runs the demo, the tests, or any vitforge command.
#
#   ./launch.sh demo            run the end-to-end demo on embedded defaults (CPU, local Ray, local S3)
#   ./launch.sh test [ARGS...]  run the test suite; ARGS go to pytest
#   ./launch.sh ARGS...         run `vitforge ARGS...` (try ./launch.sh --help)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${VITFORGE_VENV:-$ROOT/.venv}"
STAMP="$VENV/.vitforge-install-stamp"

die() { echo "launch.sh: $*" >&2; exit 1; }

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

file_digest() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1
    elif command -v shasum >/dev/null 2>&1; then shasum -a 256 "$1" | cut -d' ' -f1
    else cksum "$1" | cut -d' ' -f1,2
    fi
}

venv_python_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null
}

ensure_venv() {
    if [ -e "$VENV" ] && ! venv_python_ok; then
        die "$VENV exists but holds no working Python >= 3.11 (made by an older or removed interpreter?).
Delete it (rm -rf '$VENV') and run the same command again."
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(find_python)" || die "Python >= 3.11 is required but none was found on PATH (tried \$PYTHON, python3.11, python3.12, python3.13, python3).
Install one (e.g. 'apt-get install python3.11 python3.11-venv', 'brew install python@3.11' or pyenv), or point PYTHON=/path/to/python3.11 at it, then run the same command again."
        echo "launch.sh: creating $VENV with $py" >&2
        "$py" -m venv "$VENV" || { rm -rf "$VENV"; die "could not create a virtual environment at $VENV with $py.
On Debian/Ubuntu install the venv module (apt-get install python3-venv, or python3.11-venv), then run the same command again."; }
    fi
    local want
    want="$(file_digest "$ROOT/pyproject.toml")"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return 0
    fi
    # one installer at a time when several launch.sh start together (CI matrix, two terminals)
    # (the lock is fd 9, closed again before vitforge/pytest run)
    if command -v flock >/dev/null 2>&1; then
        exec 9>"$VENV/.vitforge-install.lock"
        flock 9
        if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
            exec 9>&-
            return 0
        fi
    fi
    echo "launch.sh: installing vitforge and its pinned dependencies into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
    if ! "$VENV/bin/python" -m pip install --quiet -e "$ROOT[local,test]" >&2; then
        die "installing vitforge's dependencies into $VENV failed (pip's message is above).
- 'No matching distribution' / connection errors: check access to your package index (PIP_INDEX_URL) and retry.
- a pinned version missing for your platform or Python: use Python 3.11 or 3.12 on Linux x86_64/aarch64 or macOS.
Then run the same command again (only the install is repeated); rm -rf '$VENV' starts from scratch."
    fi
    echo "$want" > "$STAMP"
    exec 9>&-
}

cmd="${1:-}"
case "$cmd" in
    "")
        ensure_venv
        exec "$VENV/bin/vitforge" --help
        ;;
    demo)
        shift
        ensure_venv
        exec "$VENV/bin/vitforge" demo "$@"
        ;;
    test)
        shift
        ensure_venv
        cd "$ROOT"
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        ensure_venv
        exec "$VENV/bin/vitforge" "$@"
        ;;
esac
