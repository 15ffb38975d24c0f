#!/usr/bin/env bash
# Sets everything up (reusing .venv when complete), then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest -q "$@"
