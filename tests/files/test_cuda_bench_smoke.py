"""The GPU benchmark script runs end to end under the simulator (timings meaningless)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tinyunet as tu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif("cuda" not in tu.available_backends(),
                    reason="the cuda backend (GPU or simulator) is not available")
def test_gpu_benchmark_smoke_run():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for row in ("conv3x3 forward", "max-pool backward", "| smoke |"):
        assert row in run.stdout
