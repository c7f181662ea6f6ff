"""Which threading layer the numba backend starts, in fresh processes (it is chosen once
per process, when tinyunet's kernels are first imported)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

PROBE = """
import json, os, sys
if sys.argv[1] == "torch-first":
    import torch  # noqa: F401  (loads its GNU OpenMP)
import tinyunet
tinyunet.get_backend("numba")
import numba
numba.get_num_threads()  # starts the pool if the import did not
print(json.dumps([numba.threading_layer(), os.environ.get("OMP_WAIT_POLICY"),
                  os.environ.get("GOMP_SPINCOUNT")]))
"""


def probe(mode="plain", **env):
    return probe_with_stderr(mode, **env)[0]


def probe_with_stderr(mode="plain", **env):
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


def omp_layer_loads():
    run = subprocess.run([sys.executable, "-c", "from numba.np.ufunc import omppool"],
                         capture_output=True, timeout=300)
    return run.returncode == 0


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP choice is Linux's")
def test_openmp_layer_with_passive_wait_and_the_environment_left_as_found(clean_env):
    if not omp_layer_loads():
        assert probe() == ["workqueue", None, None]
        return
    # libgomp prints the settings it read when it loaded (OMP_DISPLAY_ENV).
    layer_and_settings, stderr = probe_with_stderr(OMP_DISPLAY_ENV="verbose")
    assert layer_and_settings == ["omp", None, None]
    assert "OMP_WAIT_POLICY = 'PASSIVE'" in stderr
    from tinyunet.kernels.cpu import runtime

    assert f"GOMP_SPINCOUNT = '{runtime.OPENMP_SPIN_COUNT}'" in stderr


def test_a_passive_policy_or_spin_count_the_user_set_is_kept(clean_env):
    # A passive policy of the user's own means no spinning: libgomp's spin count 0.
    settings, stderr = probe_with_stderr(OMP_WAIT_POLICY="PASSIVE", OMP_DISPLAY_ENV="verbose")
    assert settings[1:] == ["PASSIVE", None]
    if settings[0] == "omp":
        assert "GOMP_SPINCOUNT = '0'" in stderr
    settings, stderr = probe_with_stderr(GOMP_SPINCOUNT="7", OMP_DISPLAY_ENV="verbose")
    assert settings[1:] == [None, "7"]
    if settings[0] == "omp":
        assert "GOMP_SPINCOUNT = '7'" in stderr


def test_a_wait_policy_the_user_set_is_kept_and_means_workqueue(clean_env):
    assert probe(OMP_WAIT_POLICY="active")[:2] == ["workqueue", "active"]


def test_a_threading_layer_the_user_picked_is_kept(clean_env):
    assert probe(NUMBA_THREADING_LAYER="workqueue")[0] == "workqueue"


def test_openmp_loaded_before_means_workqueue(clean_env):
    pytest.importorskip("torch")
    assert probe("torch-first") == ["workqueue", None, None]
