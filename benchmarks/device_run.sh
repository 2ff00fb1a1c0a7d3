#!/usr/bin/env bash
# Everything this project checks on a GPU, in one call (about 8 minutes on one H200):
#   1. install fxlra from this checkout (no downloads: --no-deps --no-build-isolation),
#   2. the GPU tests (kernels, the generated program's kernel path, streams, CUDA graphs,
#      placement), which skip themselves on a machine without CUDA,
#   3. benchmarks/gpu.py (correctness first, then timings) -> $OUT/gpu.json.
# Logs go to $OUT (default ./device-out); the last lines printed are the summary.
#
#     OUT=/tmp/out bash benchmarks/device_run.sh [--budget-s 270]
set -u
OUT=${OUT:-device-out}
mkdir -p "$OUT"
python3 -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1 ||
    echo "install failed (see install.log); the tests use the source tree"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels.py \
    tests/test_kernel_path.py tests/test_streams.py tests/test_graphs.py tests/test_placement.py \
    > "$OUT/tests.log" 2>&1
echo "gpu tests: exit $? ($(tail -1 "$OUT/tests.log"))"
timeout 330 python3 benchmarks/gpu.py --out "$OUT/gpu.json" "$@" > "$OUT/gpu.log" 2>&1
echo "gpu.py: exit $?"
grep -E "^(correctness|step |wrote)" "$OUT/gpu.log"
