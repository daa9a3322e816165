#!/usr/bin/env bash
# Wheels of xgen's dependencies that the device's CUDA image (Python 3.12) does not hold, into
# .gpu_wheels/ (git-ignored), for bench/gpu.sh to install there without a registry.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --disable-pip-version-check --dest .gpu_wheels --only-binary=:all: \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any --no-deps \
  "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4" "grain>=0.2.18" "clu>=0.0.12" \
  "array-record>=0.8.6" "zstandard>=0.23" "starlette>=0.40" "uvicorn>=0.30" dm-tree ml-collections
# hydra's parser runtime is published as source only: built here (pure Python, any platform).
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir .gpu_wheels antlr4-python3-runtime==4.9.3
ls .gpu_wheels
