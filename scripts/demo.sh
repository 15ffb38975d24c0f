#!/usr/bin/env bash
# Sets everything up (reusing .venv when complete), then runs the demo on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/bios demo "$@"
