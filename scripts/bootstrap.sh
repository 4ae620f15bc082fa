#!/usr/bin/env bash
# Create .venv and install m3connect with every extra and the test tools. Idempotent.
# pip's own output (build-backend warnings and the like) goes to .venv/bootstrap.log and is
# shown only when an install fails, so the quick start prints only what the demo says.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/bootstrap.log
run() {
  if ! "$@" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "bootstrap: '$*' failed (log above, also in $log)" >&2
    exit 1
  fi
}
: >"$log"
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -e '.[dev]' -c scripts/constraints.txt
