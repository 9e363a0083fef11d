#!/usr/bin/env bash
# Start the service on its default weights (CUDA when present, else CPU). Extra arguments go to
# `python -m service serve` (e.g. --host 0.0.0.0 --port 8000).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m service serve "$@"
