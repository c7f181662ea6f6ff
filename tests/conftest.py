"""Shared fixtures: every backend that can run here, and bounded hypothesis settings."""

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
