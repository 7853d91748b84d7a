#!/usr/bin/env bash
# The one-shot device check from the repository root: benchmarks/device_check.py with the
# arguments given (on a GPU machine: --out DIR --data DIR/cifar-10-batches-bin; anywhere:
# --smoke). $PYTHON picks the interpreter (default python3). See benchmarks/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/device_check.py "$@"
