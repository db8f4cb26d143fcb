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

ensure_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(find_python)" || die "Python >= 3.11 is required but none was found on PATH.
Install one (e.g. 'apt-get install python3.11 python3.11-venv' or pyenv), or point PYTHON=/path/to/python3.11 at it."
        echo "launch.sh: creating $VENV with $py" >&2
        "$py" -m venv "$VENV" || die "could not create a virtual environment at $VENV.
On Debian/Ubuntu install the venv module: apt-get install python3-venv"
    fi
    local want
    want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        return 0
    fi
    echo "launch.sh: installing vitforge and its pinned dependencies into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2 || true
    if ! "$VENV/bin/python" -m pip install --quiet -e "$ROOT[local,test]" >&2; then
        die "installing dependencies failed (see pip's message above).
Check network access to the package index, then run the same command again; delete $VENV to start clean."
    fi
    echo "$want" > "$STAMP"
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
