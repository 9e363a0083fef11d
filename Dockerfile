# syntax=docker/dockerfile:1
# MPRNet image restoration service. Uses the GPU when the container gets one (NVIDIA Container
# Toolkit: `docker run --gpus all`), the CPU otherwise. See docker/README.md.
#
#   docker build -t mprnet-service .
#   docker build -t mprnet-service --build-arg WEIGHTS="deraining=<URL or Drive id>" .
#   docker run --rm -p 8000:8000 --gpus all mprnet-service
#
# Every RUN goes through docker/install.sh, bind-mounted from the build context rather than
# copied: nothing but the installed environment ends up in the layers, and the same script runs
# outside Docker in tests/test_deployment.py.

# PyPI's torch 2.13.0 wheel is built for CUDA 13.0 and brings its own CUDA user-space libraries
# (cuBLAS, cuDNN, ... as nvidia-* wheels), so the image only needs CUDA 13.0's driver contract
# (NVIDIA_REQUIRE_CUDA, which makes the toolkit refuse drivers that are too old) and the
# toolkit's environment. The -base flavour gives exactly that; -cudnn-runtime would add a second,
# unused copy of those libraries. Any 13.0.x tag works for the same reason.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu 24.04's own Python 3.12; the wheels above exist for it.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN --mount=type=bind,source=docker/install.sh,target=/usr/local/bin/mprnet-install \
    mprnet-install venv "$VIRTUAL_ENV"

# Keep in step with TORCH_SPEC in scripts/bootstrap.sh (a test checks it): the image serves
# the PyTorch release the project is tested with.
ARG TORCH_VERSION=2.13.0
RUN --mount=type=bind,source=docker/install.sh,target=/usr/local/bin/mprnet-install \
    mprnet-install torch

# Dependencies before the source: editing the code leaves the layers above cached.
WORKDIR /src
RUN --mount=type=bind,source=docker/install.sh,target=/usr/local/bin/mprnet-install \
    --mount=type=bind,source=pyproject.toml,target=/src/pyproject.toml \
    mprnet-install dependencies

# The whole (.dockerignore-filtered) context, writable for setuptools' build folder; the writes
# are discarded with the mount.
RUN --mount=type=bind,target=/src,rw \
    bash docker/install.sh project

# Released weights, preferred over the bundled ones wherever both exist for a task. Fetched at
# build time when WEIGHTS names them ("deblurring=<URL or Drive id> denoising=<...>"); or mount
# a folder holding <task>.safetensors/.pth at this path instead (which hides any fetched here).
ENV MPRNET_WEIGHTS_DIR=/var/lib/mprnet/weights
# Converted CPU models (OpenVINO) are cached here; /tmp stays writable under a read-only root.
ENV MPRNET_MODEL_CACHE_DIR=/tmp/mprnet-models
ARG WEIGHTS=""
RUN --mount=type=bind,source=docker/install.sh,target=/usr/local/bin/mprnet-install \
    mkdir -p "$MPRNET_WEIGHTS_DIR" \
    && mprnet-install weights "$WEIGHTS"

# A fixed uid, so that volume permissions and Kubernetes' runAsUser can name it.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /var/lib/mprnet mprnet
WORKDIR /var/lib/mprnet
USER 10001:10001

EXPOSE 8000
# Models load and warm up after the port opens, so readiness (not liveness) is what "healthy"
# means; the start period covers a CPU-only start on a laptop. urllib, as curl is not installed.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
# SIGTERM starts the drain: readiness off, requests in flight get MPRNET_GRACEFUL_SHUTDOWN_S
# (30 s by default). Give `docker stop` more than that: --stop-timeout / stop_grace_period.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "serve", "--host", "0.0.0.0", "--port", "8000"]
