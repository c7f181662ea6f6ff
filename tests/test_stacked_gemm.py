"""Stacks of GEMMs split over threads (tinyunet.backends.stacked_gemm) against np.matmul,
and OpenBLAS's thread setting around a split."""

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gemm_stacks

from tinyunet.backends import stacked_gemm
from tinyunet.backends.stacked_gemm import StackedGemm


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


def stacked_gemm_with(threads):
    gemm = StackedGemm()
    blas = FakeBlasThreads(threads)
    gemm._threads = (blas.get, blas.set)
    return gemm, blas


@pytest.fixture
def split_everything(monkeypatch):
    monkeypatch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)


@settings(max_examples=30)
@given(stacks=gemm_stacks(), threads=st.integers(1, 4))
def test_split_stack_equals_numpy_matmul(stacks, threads):
    a, b = stacks
    gemm, blas = stacked_gemm_with(threads)
    out = np.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stacked_gemm, "MIN_SPLIT_FLOPS", 0)
        assert gemm.matmul(a, b, out) is out
    # Each part is numpy's own matmul on a slice of the stack: the same BLAS calls.
    np.testing.assert_array_equal(out, np.matmul(a, b))
    split = threads >= 2 and len(a) >= 2
    assert blas.set_calls == ([1, threads] if split else [])


def test_small_stacks_stay_one_numpy_call():
    gemm, blas = stacked_gemm_with(2)
    a, b = np.ones((4, 8, 8), np.float32), np.ones((4, 8, 8), np.float32)
    out = np.empty_like(a)
    gemm.matmul(a, b, out)
    assert blas.set_calls == []  # 4096 FLOPs, below MIN_SPLIT_FLOPS
    np.testing.assert_array_equal(out, np.matmul(a, b))


def test_a_failed_part_raises_and_restores_the_thread_setting(split_everything):
    gemm, blas = stacked_gemm_with(2)
    a, b = np.ones((4, 3, 5)), np.ones((4, 6, 2))  # K differs: every part fails
    with pytest.raises(ValueError):
        gemm.matmul(a, b, np.empty((4, 3, 2)))
    assert blas.set_calls == [1, 2]


def test_a_split_while_another_runs_goes_unsplit(split_everything):
    """Two splits at once would each save the other's setting of 1 thread."""
    gemm, blas = stacked_gemm_with(2)
    a, b = np.ones((4, 3, 5)), np.ones((4, 5, 2))
    out = np.empty((4, 3, 2))
    gemm._lock.acquire()
    try:
        gemm.matmul(a, b, out)
    finally:
        gemm._lock.release()
    assert blas.set_calls == []
    np.testing.assert_array_equal(out, np.matmul(a, b))


def test_openblas_thread_setting_is_restored_after_real_splits(split_everything):
    functions = stacked_gemm._openblas_thread_functions()
    if functions is None:
        pytest.skip("numpy's BLAS here is not an OpenBLAS this module can find")
    get_threads, set_threads = functions
    before = get_threads()
    set_threads(2)
    try:
        gemm = StackedGemm()
        rng = np.random.default_rng(0)
        a = rng.standard_normal((6, 16, 16), dtype=np.float32)
        b = rng.standard_normal((6, 16, 16), dtype=np.float32)
        results = []

        def run():
            out = np.empty((6, 16, 16), np.float32)
            results.append(gemm.matmul(a, b, out))

        # Splits from several threads at once: each either splits or runs unsplit.
        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert get_threads() == 2
        for out in results:
            np.testing.assert_array_equal(out, np.matmul(a, b))
        assert len(results) == 4
    finally:
        set_threads(before)
