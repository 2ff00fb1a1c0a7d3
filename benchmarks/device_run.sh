#!/usr/bin/env bash
# Everything this project checks on a GPU, in one call (about 9 minutes on one H200):
#   1. install fxlra from this checkout (no downloads: --no-deps --no-build-isolation),
#   2. the GPU-only tests (pytest -m cuda: kernels in 16 bits, CUDA streams, CUDA graphs,
#      BatchNorm statistics under cuDNN), then the kernel tests compiled for the GPU instead of
#      interpreted; neither stops at a failure, each has its own time limit,
#   3. benchmarks/gpu.py (correctness first, then timings) -> $OUT/gpu.json, written after
#      every section.
# Logs go to $OUT (default ./device-out); the last lines printed are the summary.
#
#     OUT=/tmp/out bash benchmarks/device_run.sh [--budget-s 270]
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
python3 -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1 ||
    echo "install failed (see install.log); the tests use the source tree"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
PYTEST="python3 -m pytest -q -p no:cacheprovider -rfE"
timeout 150 $PYTEST -m cuda tests/ > "$OUT/tests_cuda.log" 2>&1
echo "cuda tests: exit $? ($(tail -1 "$OUT/tests_cuda.log"))"
timeout 100 $PYTEST -m "not cuda" tests/test_kernels.py tests/test_kernel_path.py \
    > "$OUT/tests_kernels.log" 2>&1
echo "kernel tests compiled: exit $? ($(tail -1 "$OUT/tests_kernels.log"))"
timeout 330 python3 benchmarks/gpu.py --out "$OUT/gpu.json" "$@" > "$OUT/gpu.log" 2>&1
echo "gpu.py: exit $?"
grep -E "^(correctness|step |profile |wrote)" "$OUT/gpu.log"
