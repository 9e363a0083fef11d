#!/usr/bin/env bash
# Create or refresh .venv/ with the project and its test tools. Cheap when nothing changed:
# a stamp holding the hash of pyproject.toml skips the install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# torch is pinned to the release this project is tested with; on a machine with a GPU, PyPI's
# wheel of it is the CUDA build, on these CPU-only machines pip finds the CPU build on disk.
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
    # Made anew, stamp and all: a .venv whose Python has gone (removed or upgraded) would
    # otherwise keep a stamp saying its packages are installed.
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.mprnet-installed
want="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
    .venv/bin/python -m pip install --quiet -e '.[test]'
    echo "$want" > "$stamp"
fi
