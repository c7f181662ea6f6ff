"""Shared fixtures: every backend that can run here, bounded hypothesis settings, and the
markers each test gets from what it runs (``slow``, ``torch``, ``gpu``)."""

import inspect
import os

# The cuda backend's kernels run under Numba's CUDA simulator unless a real GPU is asked
# for (NUMBA_ENABLE_CUDASIM=0). It must be set before numba is first imported.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import tinyunet as tu  # noqa: E402

# Derandomized so that CI sees the same examples every run; bounded so that the whole
# suite stays within its time budget.
settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("ci")

BACKENDS = tu.available_backends()


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Each backend available on this machine, by name."""
    return request.param


# Whole files that start processes or train models: the inner loop (-m "not slow") leaves
# them to CI.
SLOW_FILES = {
    "test_bench_smoke.py", "test_cuda_bench_smoke.py", "test_kill_drill.py",
    "test_real_data.py", "test_instance_workflow.py", "test_export.py", "test_cli.py",
    "test_file_safety.py", "test_checkpoint_safety.py", "test_distributed.py",
    "test_cuda_training.py", "test_cuda_ptx.py", "test_numba_backend.py", "test_train.py",
}
# In these, the numpy backend's cases stay in the inner loop; the compiled backends' and
# the simulator's (compile time, and about 1 ms a simulated thread) are slow.
SLOW_UNLESS_NUMPY = {"test_gradients.py", "test_engine_edges.py", "test_cuda_kernels.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        name = item.path.name
        params = getattr(item, "callspec", None)
        backend_name = params.params.get("backend") if params else None
        if name in SLOW_FILES or (name in SLOW_UNLESS_NUMPY and backend_name != "numpy"):
            item.add_marker(pytest.mark.slow)
        if backend_name == "cuda" or name.startswith("test_cuda"):
            item.add_marker(pytest.mark.gpu)
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if "torch" in name or 'importorskip("torch")' in source:
            item.add_marker(pytest.mark.torch)
