#!/usr/bin/env bash
# Sets everything up, then trains configs/tiny.yaml on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/moe-lightning fit --config configs/tiny.yaml "$@"
