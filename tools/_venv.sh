# Sourced by tools/demo and tools/test: makes .venv (Python 3.11+) if absent and installs the
# project with the extras given in $EXTRAS into it. pip runs only when setup.cfg or
# pyproject.toml (or the extras) changed since the last install, recorded in
# .venv/.installed-EXTRAS (delete it to force a reinstall). pip's output goes to
# .venv/pip-install.log: printed whole if the install fails, its ERROR lines always.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
  "$PY" -m venv .venv
fi
STAMP=.venv/.installed-${EXTRAS:-base}
WANT=$(cat setup.cfg pyproject.toml | cksum)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  LOG=.venv/pip-install.log
  echo "installing the project into .venv (pip install -e .${EXTRAS:+[$EXTRAS]}; log: $LOG)"
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"; } >"$LOG" 2>&1; then
    cat "$LOG" >&2
    echo "error: installing the project into .venv failed (pip's output above, also in $LOG)" >&2
    exit 1
  fi
  grep '^ERROR' "$LOG" >&2 || true
  echo "$WANT" >"$STAMP"
fi
export PATH="$PWD/.venv/bin:$PATH"
# TensorFlow's C++ INFO/WARNING lines off (errors stay), as research/logs.py does for the CLIs.
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
