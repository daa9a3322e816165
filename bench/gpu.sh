#!/usr/bin/env bash
# The device checks for a lent NVIDIA GPU (an H200 here), as one prepared script (not yet run on one):
#   here, once:  bash bench/gpu_wheels.sh      (xgen's dependencies the device image lacks, as wheels)
#   there:       device run, carry [".gpu_wheels"], command "bash bench/gpu.sh"
# The device image has CUDA JAX, flax, optax, orbax and torch but no registry access: the rest
# comes from .gpu_wheels. Measures the 1B model's 8K training step (bf16, cuDNN attention,
# scanned layers, chunked loss) with two remat policies, and copies docs/performance.md to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
python3 -m pip install --quiet --no-index --find-links .gpu_wheels --no-deps .gpu_wheels/*.whl
python3 -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax; print(jax.__version__, jax.devices())"
python3 bench/accelerator.py --hardware gpu_h200 --model 1b --seq 8192 --rows 8 --steps 5 --remat save_dots --write || true
python3 bench/accelerator.py --hardware gpu_h200 --model 1b --seq 8192 --rows 8 --steps 5 --remat full --write || true
mkdir -p "${OUT:-/tmp/out}" && cp docs/performance.md "${OUT:-/tmp/out}/"
