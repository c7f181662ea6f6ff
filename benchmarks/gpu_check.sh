#!/usr/bin/env bash
# Every GPU check in one run, for a machine with an NVIDIA GPU, CuPy and numba:
#   1. versions and the GPU;
#   2. every test of the cuda backend on the real GPU (NUMBA_ENABLE_CUDASIM=0);
#   3. the GPU benchmark, which rewrites RESULTS.md's GPU section;
#   4. a short training run of the CLI on the built-in data.
# Each stage has its own time limit and log, and a failing stage does not stop the
# next; the script exits 1 if any stage failed. Logs go to $OUT (default
# gpu-check-logs/), with a copy of RESULTS.md. The training run writes its checkpoints
# and plots to /tmp, not $OUT: a lent GPU machine sends back only a few files.
#
#   bash benchmarks/gpu_check.sh            # from the repository's root
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 NUMBA_ENABLE_CUDASIM=0
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

stage() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "=== $name (limit $limit s)"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-15}" "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || failed=1
}

failed=0

stage env 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm \
    --format=csv; $PY -c '
import platform, numpy, numba, cupy
from numba import cuda
print(\"python\", platform.python_version(), \"numpy\", numpy.__version__, \"numba\",
      numba.__version__, \"cupy\", cupy.__version__, \"cuda available\", cuda.is_available())
try:
    import torch
    print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available())
except ImportError:
    print(\"torch not installed\")
'"
# One process (-o addopts: no xdist workers): one GPU, and a lent machine may lack xdist.
stage tests "${TESTS_LIMIT:-300}" "$PY" -m pytest -o addopts=-ra -v --tb=short --maxfail=10 \
    -k cuda -p no:cacheprovider
stage bench "${BENCH_LIMIT:-240}" "$PY" -m benchmarks.gpu
stage train "${TRAIN_LIMIT:-120}" "$PY" -m tinyunet train --backend cuda --epochs 4 \
    --out /tmp/tinyunet-gpu-run
cp benchmarks/RESULTS.md "$OUT/"
exit "$failed"
