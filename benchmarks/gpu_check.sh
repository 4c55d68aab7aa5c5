#!/usr/bin/env bash
# One command that proves the kernels on a card (issue 10 §5):
#   benchmarks/gpu_check.sh OUTDIR            install offline, tests natively, benchmarks, summary (<= 9 min)
#   benchmarks/gpu_check.sh --dry-run OUTDIR  print the plan and check that every command in it parses
# The plan and its logic live in benchmarks/gpu_check.py; PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
# `-m benchmarks.gpu_check` from the checkout: the project is not installed yet when the check starts.
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
