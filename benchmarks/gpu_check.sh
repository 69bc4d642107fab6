#!/usr/bin/env bash
# On a machine with an accelerator and no network: correctness first, then the benchmark.
# Needs jax with its accelerator plugin, tensorstore, orbax-checkpoint, psutil, pyyaml and
# matplotlib installed there; crc32c may come as a wheel in .gpu/ (carried along),
# fetched here beforehand with:
#   pip download crc32c --python-version 3.12 --only-binary=:all: --no-deps \
#       --platform manylinux_2_28_x86_64 -d .gpu
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT" /tmp/shardsave-pylib
if ! python3 -c "import crc32c" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/shardsave-pylib .gpu/crc32c-*.whl
fi
export PYTHONPATH="$PWD:/tmp/shardsave-pylib:${PYTHONPATH:-}"
nvidia-smi -L || true
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
python3 benchmarks/bench.py --profile "${PROFILE:-gpu}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
