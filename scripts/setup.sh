#!/usr/bin/env bash
# Creates .venv and installs moe_lightning with its test extras, and the backend plugins (plugins/<name>), on a CPU
# machine. torch is pinned to the CPU build (2.13.0) in the same command so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]' -e plugins/deepspeed
