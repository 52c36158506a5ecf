#!/usr/bin/env bash
# Check and measure brisk on a CUDA card in about ten minutes, with no network (scripts/gpu_check.py --help):
#   scripts/gpu_check.sh --out gpu_check                                 # Llama-2-7B-shaped random weights
#   scripts/gpu_check.sh --device cpu --preset llama-68m --out /tmp/dry   # a dry run on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/gpu_check.py "$@"
