#!/usr/bin/env bash
# Fills .whl/ with every wheel the device image lacks for the service to import and serve, for each
# Python version a device may run (3.11 to 3.13: fastapi 0.165 needs 3.11), dependencies resolved by
# pip (not guessed), pinned to the versions this checkout's .venv was tested with. bench/gpu.sh
# unpacks the ones that fit the device's interpreter (bench/install_wheels.py); no pip is needed there.
#
# The device image already has torch, numpy, pillow, httpx, prometheus-client and safetensors
# (/work/.library/device/KINDS.md); pulling them again would add hundreds of megabytes against the
# call's 64 MiB. tqdm is listed because the service imports it and a device-like venv lacks it.
#
#   bash bench/gpu_wheels.sh        # then: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSIONS=${VERSIONS:-3.11 3.12 3.13}
NEEDED=(fastapi uvicorn pydantic pydantic-settings python-multipart swagger-ui-bundle-v2 tqdm)

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
pins=()
for name in "${NEEDED[@]}"; do
  pins+=("$name==$($PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf .whl && mkdir -p .whl
for version in $VERSIONS; do
  $PY -m pip download -q --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${pins[@]}" 2>&1 | { grep -v "^WARNING: Location" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "pip could not download the wheels for Python $version"; exit 1; }
done
printf '%s\n' "${pins[@]}" > .whl/PINS.txt
echo "$(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1), for Python $VERSIONS: ${pins[*]}"
