"""GEMMs on numba's thread pool (tinyunet.backends.numba.blas and gemm.gemm_parts) against
np.matmul, and OpenBLAS's thread setting around a call."""

import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import gemm_operands
from tinyunet.kernels.cpu import gemm, runtime

from tinyunet.backends.numba import blas

needs_openblas = pytest.mark.skipif(
    not blas.available(),
    reason="numpy's BLAS here is not a pthreads OpenBLAS with 64-bit-integer cblas GEMMs")


def tolerance(dtype):
    """BLAS may sum a part of a matrix in another order than the whole."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}


def expected(a, b, out, accumulate):
    return (out if accumulate else 0) + np.matmul(a, b)


class RecordingBlasThreads:
    """OpenBLAS's real get/set thread functions, recording what gemm sets."""

    def __init__(self, functions):
        self.get, self.real_set = functions
        self.set_calls = []

    def set(self, threads):
        self.set_calls.append(threads)
        self.real_set(threads)


@pytest.fixture
def recording_blas(monkeypatch):
    recorder = RecordingBlasThreads(blas._blas.thread_functions())
    monkeypatch.setattr(blas._blas, "threads", (recorder.get, recorder.set))
    monkeypatch.setattr(runtime, "MIN_PARALLEL_FLOPS", 0)
    return recorder


@needs_openblas
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_one_row_operand_with_gaps_between_its_entries_runs_on_the_pool(dtype,
                                                                          recording_blas):
    """A (1, K) operand cut from the transpose of a wider array (its entries 3 apart):
    BLAS reads it as a transposed matrix, as the rest of gemm_operands' draws."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3)).astype(dtype)[:, :1].T  # (1, 5), column stride 3
    b = rng.standard_normal((5, 4)).astype(dtype)
    assert blas._layout(a) == (gemm.CBLAS_TRANS, 3)
    out = np.empty((1, 4), dtype)
    blas.gemm(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-6)
    assert recording_blas.set_calls == [1, recording_blas.get()]  # ran on the pool


@needs_openblas
@settings(max_examples=40)
@given(operands=gemm_operands(), accumulate=st.booleans())
def test_gemm_equals_numpy_matmul(operands, accumulate):
    a, b, out = operands
    want = expected(a, b, out.copy(), accumulate)
    recorder = RecordingBlasThreads(blas._blas.thread_functions())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runtime, "MIN_PARALLEL_FLOPS", 0)  # every call on the pool
        patch.setattr(blas._blas, "threads", (recorder.get, recorder.set))
        assert blas.gemm(a, b, out, accumulate) is out
    np.testing.assert_allclose(out, want, **tolerance(out.dtype))
    assert recorder.set_calls[:1] == [1]  # it ran on the pool, not in numpy


@needs_openblas
@settings(max_examples=40)
@given(operands=gemm_operands(), parts=st.integers(1, 4), accumulate=st.booleans())
def test_gemm_parts_split_any_way_equals_numpy_matmul(operands, parts, accumulate):
    """Whole matrices per step, or each matrix cut along its rows or its columns."""
    a, b, out = operands
    want = expected(a, b, out.copy(), accumulate)
    stack = out.shape[0] if out.ndim == 3 else 1
    (trans_a, lda), (trans_b, ldb), (_, ldc) = (blas._layout(x) for x in (a, b, out))
    steps = [blas._stack_step(x, stack) for x in (a, b, out)]
    get_threads, set_threads = blas._blas.thread_functions()
    saved = get_threads()
    set_threads(1)
    try:
        run = gemm.gemm_parts if parts > 1 else gemm.gemm_parts.serial
        run(out.dtype == np.float64, a.ctypes.data, steps[0], b.ctypes.data,
            steps[1], out.ctypes.data, steps[2], stack, out.shape[-2], out.shape[-1],
            a.shape[-1], trans_a, lda, trans_b, ldb, ldc, 1.0 if accumulate else 0.0, parts)
    finally:
        set_threads(saved)
    np.testing.assert_allclose(out, want, **tolerance(out.dtype))


@settings(max_examples=20)
@given(operands=gemm_operands(max_stack=3), accumulate=st.booleans())
def test_gemm_without_openblas_is_numpy_matmul(operands, accumulate):
    a, b, out = operands
    want = expected(a, b, out.copy(), accumulate)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(blas._blas, "threads", ())
        blas.gemm(a, b, out, accumulate)
    np.testing.assert_array_equal(out, want)


@needs_openblas
@pytest.mark.parametrize("case", ["int dtype", "overlap", "reversed rows", "mixed dtypes",
                                  "small", "read-only out", "overlapping out matrices",
                                  "1-D operand"])
def test_calls_blas_cannot_take_go_to_numpy(case, recording_blas, monkeypatch):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((5, 6))
    out = np.empty((6, 6))
    if case == "int dtype":
        a, b, out = (x.astype(np.int64) for x in (a, b, out))
    elif case == "overlap":
        out = np.zeros((6, 6))
        a = out[:, :5]
    elif case == "reversed rows":
        a = a[::-1]
    elif case == "mixed dtypes":
        b = b.astype(np.float32)
    elif case == "read-only out":
        out.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            blas.gemm(a, b, out)
        assert recording_blas.set_calls == []
        return
    elif case == "overlapping out matrices":
        # Matrix 1 starts on matrix 0's second row: numpy writes them in order.
        a, b = np.stack([a, 2 * a]), np.stack([b, b])
        overlapping = np.lib.stride_tricks.as_strided
        out = overlapping(np.zeros(6 * 6 + 6), (2, 6, 6), (48, 48, 8))
        want = overlapping(np.zeros(6 * 6 + 6), (2, 6, 6), (48, 48, 8))
        np.matmul(a, b, out=want)
        blas.gemm(a, b, out)
        np.testing.assert_allclose(out, want)
        assert recording_blas.set_calls == []
        return
    elif case == "1-D operand":
        a, out = a[0], out[0]
    else:
        monkeypatch.setattr(runtime, "MIN_PARALLEL_FLOPS", 2 * 6 * 6 * 5 + 1)
    want = np.matmul(a, b)
    blas.gemm(a, b, out)
    np.testing.assert_allclose(out, want)
    assert recording_blas.set_calls == []


@needs_openblas
def test_a_plan_is_worked_out_once_per_layout_and_memory_is_checked_every_call(
        recording_blas, monkeypatch):
    """Plans are cached by shapes, strides and dtypes; what depends on the arrays
    themselves (read-only, overlapping operands) is checked on every call."""
    worked_out = []
    plan = blas._plan
    monkeypatch.setattr(blas, "_plan", lambda *arrays: worked_out.append(1) or plan(*arrays))
    monkeypatch.setattr(blas, "_plans", {})
    rng = np.random.default_rng(0)
    shared, other = np.zeros((6, 11)), rng.standard_normal((6, 11))
    b = rng.standard_normal((5, 6))
    a, out = other[:, :5], shared[:, 5:]  # same shapes and strides as the next call's
    blas.gemm(a, b, out)
    np.testing.assert_allclose(out, a @ b)
    assert recording_blas.set_calls == [1, recording_blas.get()]
    shared[:, :5] = rng.standard_normal((6, 5))
    want = shared[:, :5] @ b
    blas.gemm(shared[:, :5], b, shared[:, 5:])  # a and out in one buffer: numpy's turn
    np.testing.assert_allclose(shared[:, 5:], want)
    assert len(recording_blas.set_calls) == 2
    read_only = np.empty((6, 11))[:, 5:]
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        blas.gemm(a, b, read_only)
    assert len(recording_blas.set_calls) == 2 and worked_out == [1]
    monkeypatch.setattr(runtime, "MIN_PARALLEL_FLOPS", 10**9)  # another threshold, another plan
    blas.gemm(a, b, out)
    assert len(recording_blas.set_calls) == 2 and worked_out == [1, 1]


@needs_openblas
def test_a_cached_plan_runs_on_the_pool_with_each_calls_own_arrays(recording_blas,
                                                                    monkeypatch):
    """Calls of one layout share a plan, but each must read and write its own arrays,
    read-only operands included."""
    monkeypatch.setattr(blas, "_plans", {})
    rng = np.random.default_rng(1)
    calls = []
    for _ in range(3):
        a = rng.standard_normal((3, 8, 6), dtype=np.float32).transpose(0, 2, 1)  # (3, 6, 8)
        b = np.broadcast_to(rng.standard_normal((1, 8, 5), dtype=np.float32), (1, 8, 5))
        a.flags.writeable = False
        calls.append((a, b, np.full((3, 6, 5), np.nan, dtype=np.float32)))
    for a, b, out in calls:
        blas.gemm(a, b, out)
    for a, b, out in calls:
        np.testing.assert_allclose(out, np.matmul(a, b), **tolerance(out.dtype))
    assert len(blas._plans) == 1
    assert recording_blas.set_calls.count(1) == 3  # all three ran on the pool


@pytest.mark.parametrize("view", ["contiguous", "transposed", "3-D slice", "read-only",
                                  "broadcast", "reversed"])
def test_address_is_the_first_elements(view):
    base = np.arange(4 * 6 * 8, dtype=np.float64).reshape(4, 6, 8)
    array = {"contiguous": base, "transposed": base[0].T, "3-D slice": base[1:, 2:, ::2],
             "read-only": np.broadcast_to(base[0], (3, 6, 8)),
             "broadcast": np.broadcast_to(base[:1], (4, 6, 8)), "reversed": base[::-1]}[view]
    assert gemm.address(array) == array.ctypes.data


@needs_openblas
def test_the_plan_cache_starts_again_when_full(recording_blas, monkeypatch):
    monkeypatch.setattr(blas, "_plans", {})
    monkeypatch.setattr(blas, "_MAX_PLANS", 2)
    for n in range(2, 7):
        a, b = np.ones((3, n)), np.ones((n, 4))
        np.testing.assert_array_equal(blas.gemm(a, b, np.empty((3, 4))), np.full((3, 4), n))
        assert len(blas._plans) in (1, 2)


def test_shape_errors_are_numpy_matmul_errors():
    with pytest.raises(ValueError, match="matmul"):
        blas.gemm(np.ones((3, 4)), np.ones((5, 2)), np.empty((3, 2)))


@needs_openblas
def test_a_call_while_another_runs_goes_to_numpy(recording_blas):
    """Two calls at once would each save the other's setting of 1 thread."""
    a, b = np.ones((4, 3, 5)), np.ones((4, 5, 2))
    out = np.empty((4, 3, 2))
    with blas._blas.lock:
        blas.gemm(a, b, out)
    assert recording_blas.set_calls == []
    np.testing.assert_array_equal(out, np.matmul(a, b))


@needs_openblas
def test_openblas_thread_setting_is_restored_after_calls_from_several_threads(
        recording_blas):
    get_threads, set_threads = recording_blas.get, recording_blas.real_set
    before = get_threads()
    set_threads(2)
    try:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((6, 16, 16), dtype=np.float32)
        b = rng.standard_normal((6, 16, 16), dtype=np.float32)
        results = []

        def run():
            for _ in range(20):
                results.append(blas.gemm(a, b, np.empty((6, 16, 16), np.float32)))

        threads = [threading.Thread(target=run) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert get_threads() == 2
        assert recording_blas.set_calls[:2] == [1, 2]  # at least one ran on the pool
        assert len(results) == 80
        for out in results:
            np.testing.assert_allclose(out, np.matmul(a, b), rtol=1e-5, atol=1e-5)
    finally:
        set_threads(before)


@needs_openblas
def test_openblas_thread_setting_is_restored_when_the_kernel_raises(recording_blas,
                                                                    monkeypatch):
    before = recording_blas.get()

    def failing(*args):
        raise RuntimeError("kernel failed")

    monkeypatch.setattr(gemm, "gemm_parts", failing)
    failing.serial = failing
    with pytest.raises(RuntimeError, match="kernel failed"):
        blas.gemm(np.ones((8, 8)), np.ones((8, 8)), np.empty((8, 8)))
    assert recording_blas.get() == before
    assert not blas._blas.lock.locked()


@needs_openblas
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_gets_numpy_matmul_and_a_free_lock(recording_blas):
    a, b = np.ones((4, 3, 5)), np.ones((4, 5, 2))
    with blas._blas.lock:  # held by this thread when the child is made
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child, which reports by exit code
            out = np.empty((4, 3, 2))
            blas.gemm(a, b, out)
            ok = (np.array_equal(out, np.matmul(a, b)) and not blas._blas.lock.locked()
                  and not blas.available())
            os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, 9)
    pytest.fail("the forked child's call hung")
