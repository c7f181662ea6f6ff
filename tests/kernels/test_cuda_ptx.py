"""Every CUDA kernel compiles to PTX for sm_80 and sm_90 with the real NVVM.

The test session runs with Numba's CUDA simulator on (see conftest.py), whose
compile_ptx is not the real compiler, so the compilation runs in a subprocess with
NUMBA_ENABLE_CUDASIM=0. It needs libNVVM (the CUDA toolkit, or pip's nvidia-nvvm), not
a GPU; the test skips, saying so, only where libNVVM cannot be found.
"""

import json
import os
import subprocess
import sys

import pytest

# Argument types as the backend passes them: C-contiguous arrays, Python ints (int64),
# floats (float64) and bools. {dtype} becomes float32 and float64 in turn.
SIGNATURES = {
    "im2col": "({dtype}[:, :, :, ::1], {dtype}[:, :, :, :, :, ::1], " + ", ".join(["int64"] * 6)
    + ")",
    "col2im": "({dtype}[:, :, :, :, :, ::1], {dtype}[:, :, :, ::1], " + ", ".join(["int64"] * 6)
    + ")",
    "max_pool_forward": "({dtype}[:, :, :, ::1], {dtype}[:, :, :, ::1], int64[:, :, :, ::1], "
    + ", ".join(["int64"] * 8) + ")",
    "max_pool_backward": "({dtype}[:, :, :, ::1], int64[:, :, :, ::1], {dtype}[:, :, :, ::1], "
    + ", ".join(["int64"] * 8) + ")",
    "bias_relu": "({dtype}[::1], {dtype}[::1], int64, int64, boolean)",
    "relu_forward": "({dtype}[::1], {dtype}[::1])",
    "relu_backward": "({dtype}[::1], {dtype}[::1], {dtype}[::1])",
    "overlap_sums": "({dtype}[:, ::1], {dtype}[:, ::1], float64[:, ::1])",
    "sgd_step": "({dtype}[::1], {dtype}[::1], {dtype}[::1], float64, float64, float64, boolean, "
    "float64, boolean)",
    "adam_step": "({dtype}[::1], {dtype}[::1], {dtype}[::1], {dtype}[::1], float64, float64, "
    "float64, float64, float64, boolean, float64, float64)",
}

COMPILE_ALL = """
import json, re, sys
from numba import cuda
from numba.core import types
from numba.types import *  # noqa: F403 - the names used in the signature strings
from tinyunet.kernels import cuda as cuda_kernels

signatures, results = json.loads(sys.argv[1]), {}
for name, template in signatures.items():
    for dtype in ("float32", "float64"):
        for cc in ((8, 0), (9, 0)):
            ptx, _ = cuda.compile_ptx(getattr(cuda_kernels, name).py_func,
                                      eval(template.format(dtype=dtype)), cc=cc)
            results[f"{name}/{dtype}/sm_{cc[0]}{cc[1]}"] = {
                "target": re.search(r"[.]target (\\w+)", ptx).group(1),
                "kernel_entries": ptx.count(".entry "),
            }
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL, json.dumps(SIGNATURES)],
                         capture_output=True, text=True, env=env, timeout=600)
    missing = ("cannot be found", "not found", "no such file")
    if run.returncode != 0 and "nvvm" in run.stderr.lower() and any(
            words in run.stderr.lower() for words in missing):
        pytest.skip(f"libNVVM is not installed here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_kernel_is_covered():
    import importlib
    import pkgutil

    from tinyunet.kernels import cuda as cuda_kernels

    # Every kernel of every family file, and each exported by the package.
    kernels = set()
    for info in pkgutil.iter_modules(cuda_kernels.__path__):
        module = importlib.import_module(f"{cuda_kernels.__name__}.{info.name}")
        kernels |= {name for name, value in vars(module).items()
                    if type(value).__name__ in ("CUDADispatcher", "FakeCUDAKernel")}
    assert kernels == set(SIGNATURES)
    assert all(hasattr(cuda_kernels, name) for name in kernels)


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_kernel_compiles_to_ptx(compiled, name):
    for dtype in ("float32", "float64"):
        for arch in ("sm_80", "sm_90"):
            summary = compiled[f"{name}/{dtype}/{arch}"]
            assert summary == {"target": arch, "kernel_entries": 1}
