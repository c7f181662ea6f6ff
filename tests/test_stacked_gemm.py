"""Stacks of GEMMs split over threads (tinyunet.backends.stacked_gemm) against np.matmul,
and OpenBLAS's thread setting around a split."""

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gemm_stacks

from tinyunet.backends import stacked_gemm


class FakeBlasThreads:
    """Stands in for OpenBLAS's get/set thread functions, so any thread count can be
    split for on any machine; records what the split sets."""

    def __init__(self, threads):
        self.threads = threads
        self.set_calls = []

    def get(self):
        return self.threads

    def set(self, threads):
        self.set_calls.append(threads)
        self.threads = threads


@pytest.fixture
def fake_blas(monkeypatch):
    """fake_blas(threads) -> FakeBlasThreads that the splitter then uses."""

    def install(threads):
        blas = FakeBlasThreads(threads)
        monkeypatch.setattr(stacked_gemm._splitter, "threads", (blas.get, blas.set))
        return blas

    return install


@settings(max_examples=30)
@given(stacks=gemm_stacks(), threads=st.integers(1, 4))
def test_split_stack_equals_numpy_matmul(stacks, threads):
    a, b = stacks
    blas = FakeBlasThreads(threads)
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)
        patch.setattr(stacked_gemm._splitter, "threads", (blas.get, blas.set))
        assert stacked_gemm.matmul(a, b, out) is out
    # Each part is numpy's own matmul on a slice of the stack: the same BLAS calls.
    np.testing.assert_array_equal(out, np.matmul(a, b))
    split = threads >= 2 and len(a) >= 2
    assert blas.set_calls == ([1, threads] if split else [])


def test_small_stacks_stay_one_numpy_call(fake_blas):
    blas = fake_blas(2)
    a, b = np.ones((4, 8, 8), np.float32), np.ones((4, 8, 8), np.float32)
    out = np.empty_like(a)
    stacked_gemm.matmul(a, b, out)
    assert blas.set_calls == []  # 4096 FLOPs, below MIN_SPLIT_FLOPS
    np.testing.assert_array_equal(out, np.matmul(a, b))


def test_a_failed_part_raises_after_every_part_ended(fake_blas, monkeypatch):
    """The call returns only when no part can still write into ``out``: here the first
    worker's part fails at once while the second's is still running."""
    monkeypatch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)
    blas = fake_blas(3)
    finished = []
    real_matmul = np.matmul

    def failing_or_slow(a, b, out):
        if a[0, 0, 0] == 7:
            raise ValueError("this part fails")
        if len(a) == 2:
            time.sleep(0.3)
        finished.append(len(a))
        return real_matmul(a, b, out=out)

    monkeypatch.setattr(stacked_gemm.np, "matmul", failing_or_slow)
    a, b = np.ones((5, 3, 5)), np.ones((5, 5, 2))  # parts: a[0:1], a[1:3], a[3:5]
    a[1, 0, 0] = 7
    with pytest.raises(ValueError, match="this part fails"):
        stacked_gemm.matmul(a, b, np.empty((5, 3, 2)))
    assert sorted(finished) == [1, 2]
    assert blas.set_calls == [1, 3]


def test_a_split_while_another_runs_goes_unsplit(fake_blas, monkeypatch):
    """Two splits at once would each save the other's setting of 1 thread."""
    monkeypatch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)
    blas = fake_blas(2)
    a, b = np.ones((4, 3, 5)), np.ones((4, 5, 2))
    out = np.empty((4, 3, 2))
    with stacked_gemm._splitter.lock:
        stacked_gemm.matmul(a, b, out)
    assert blas.set_calls == []
    np.testing.assert_array_equal(out, np.matmul(a, b))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_splits_with_a_fresh_pool(fake_blas, monkeypatch):
    monkeypatch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)
    fake_blas(2)
    a, b = np.ones((4, 3, 5)), np.ones((4, 5, 2))
    stacked_gemm.matmul(a, b, np.empty((4, 3, 2)))  # the parent's pool now exists
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child, which reports by exit code
        out = np.empty((4, 3, 2))
        stacked_gemm.matmul(a, b, out)
        os._exit(0 if np.array_equal(out, np.matmul(a, b)) else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, 9)
    pytest.fail("the forked child's split hung")


def test_openblas_thread_setting_is_restored_after_real_splits(monkeypatch):
    functions = stacked_gemm._openblas_thread_functions()
    if functions is None:
        pytest.skip("numpy's BLAS here is not a pthreads OpenBLAS this module can find")
    get_threads, set_threads = functions
    settings_made = []

    def recording_set(threads):
        settings_made.append(threads)
        set_threads(threads)

    monkeypatch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)
    monkeypatch.setattr(stacked_gemm._splitter, "threads", (get_threads, recording_set))
    before = get_threads()
    set_threads(2)
    try:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((6, 16, 16), dtype=np.float32)
        b = rng.standard_normal((6, 16, 16), dtype=np.float32)
        results = []

        def run():
            out = np.empty((6, 16, 16), np.float32)
            results.append(stacked_gemm.matmul(a, b, out))

        # Splits from several threads at once: each either splits or runs unsplit.
        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert get_threads() == 2
        assert settings_made[:2] == [1, 2]  # at least one real split happened
        for out in results:
            np.testing.assert_array_equal(out, np.matmul(a, b))
        assert len(results) == 4
    finally:
        set_threads(before)
