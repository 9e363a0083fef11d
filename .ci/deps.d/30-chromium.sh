#!/usr/bin/env bash
# The browser test (tests/test_web.py) drives Debian's Chromium through Playwright. Playwright's
# own browser download is never used: CI machines may be offline, and the distribution's build is
# the one users run. Only the Python package comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        sudo="sudo"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium
fi

bash scripts/bootstrap.sh
if ! .venv/bin/python -c "import playwright" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "playwright>=1.40"
fi
