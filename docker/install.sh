#!/usr/bin/env bash
# The Dockerfile's install steps, one argument per image layer. They live here rather than inline
# so that exactly the same commands also run where there is no Docker engine:
# tests/test_deployment.py runs every step below in a fresh virtual environment.
#
#   install.sh venv DIR       the virtual environment the image runs from (Ubuntu's Python is
#                             "externally managed", so pip may not install into it directly)
#   install.sh torch          the PyTorch build, $TORCH_VERSION (PyPI's Linux wheel: CUDA 13.0)
#   install.sh dependencies   every other dependency, read from ./pyproject.toml
#   install.sh project        the project from ./ (bundled weights ride along as package data)
#   install.sh weights SPECS  released weights into $MPRNET_WEIGHTS_DIR; SPECS is
#                             "TASK=SOURCE[#sha256=HEX] ..." (SOURCE: URL, Drive id or file)
#
# Steps after `venv` use the `python` first on PATH, which the Dockerfile points at the venv.
set -euo pipefail

step="${1:?usage: install.sh venv DIR | torch | dependencies | project | weights SPECS}"
pip_install() { python -m pip install --no-cache-dir --disable-pip-version-check --quiet "$@"; }

case "$step" in
    venv)
        python3 -m venv "${2:?install.sh venv needs a directory}"
        ;;
    torch)
        # Its own layer: with its CUDA libraries it is by far the largest, and changes least.
        pip_install "torch==${TORCH_VERSION:?set TORCH_VERSION}"
        ;;
    dependencies)
        # Read from pyproject.toml so that this layer changes only when the dependencies do,
        # not on every edit of the source.
        requirements="$(mktemp)"
        python - > "$requirements" <<'PY'
import tomllib
with open("pyproject.toml", "rb") as handle:
    print("\n".join(tomllib.load(handle)["project"]["dependencies"]))
PY
        pip_install --requirement "$requirements"
        rm -f "$requirements"
        ;;
    project)
        # --no-deps: the layers above hold every dependency, and `pip check` proves it, so a
        # dependency added to pyproject.toml without rebuilding that layer fails here, loudly.
        pip_install --no-deps .
        python -m pip check
        python -m service weights list
        ;;
    weights)
        for spec in ${2:-}; do
            task="${spec%%=*}"
            source="${spec#*=}"
            if [ "$task" = "$spec" ] || [ -z "$source" ]; then
                echo "install.sh weights: expected TASK=SOURCE, got '$spec'" >&2
                exit 2
            fi
            checksum=()
            case "$source" in
                *"#sha256="*) checksum=(--sha256 "${source##*#sha256=}"); source="${source%#sha256=*}" ;;
            esac
            python -m service weights install "$task" --from "$source" "${checksum[@]}" --quiet
        done
        # The installer writes through a private (0600) temporary file; the image installs as
        # root but serves as an unprivileged user, who must be able to read the weights.
        if [ -d "${MPRNET_WEIGHTS_DIR:-}" ]; then
            chmod -R a+rX "$MPRNET_WEIGHTS_DIR"
        fi
        ;;
    *)
        echo "install.sh: unknown step '$step'" >&2
        exit 2
        ;;
esac
