#!/usr/bin/env bash
# Installs what the dashboard's browser test needs when it is missing: Debian's chromium and
# chromium-driver (apt, as root) and selenium (pip, pinned in requirements/server.txt).
# Exit 0 when both are usable afterwards; non-zero (with the reason on stderr) otherwise, so
# the test set-up can skip with that reason.
set -uo pipefail
cd "$(dirname "$0")/.."

have_browser() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if ! have_browser; then
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: chromium/chromedriver missing and cannot apt-get install them (need root on Debian)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq chromium chromium-driver >/dev/null || {
    echo "setup_browser: apt-get install chromium chromium-driver failed" >&2; exit 1; }
fi
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import selenium" 2>/dev/null; then
  "$PY" -m pip install -q "$(grep -E '^selenium==' requirements/server.txt | cut -d' ' -f1)" || {
    echo "setup_browser: pip install selenium failed" >&2; exit 1; }
fi
have_browser && echo "setup_browser: $(chromium --version 2>/dev/null | head -1) ready"
