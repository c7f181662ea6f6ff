"""Stacks of small GEMMs, one GEMM per BLAS thread instead of every thread on each GEMM.

Shapes: a (S, M, K) @ b (S, K, N) -> out (S, M, N), S different matrix pairs (the
Winograd convs' alpha^2 GEMMs: S = 16 or 36, M and K the channel counts).

numpy's matmul on a stack calls BLAS once per matrix, and OpenBLAS splits each call
over its threads. On GEMMs of 32-256 channels those threads spend much of the call
waiting for each other: measured on this project's 2-core machine, 36 GEMMs of
(64, 32) @ (32, 1792) ran at 54 GFLOP/s on OpenBLAS's 2 threads and 74 on one, and at
146 with the stack split in two halves, each run by one thread with OpenBLAS held to
one thread. ``matmul`` does that: it splits the stack over as many threads as OpenBLAS
is set to use (so OPENBLAS_NUM_THREADS and the like keep their meaning), holding
OpenBLAS to one thread for the length of the call and restoring its setting after.

That setting is process-wide: while a split runs, a GEMM that another thread of the
program starts runs on one thread. Where OpenBLAS is not found (another BLAS, a
platform without /proc/self/maps) or is set to one thread, ``matmul`` is numpy's.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# Stacks doing less arithmetic than this stay one numpy call: handing half a stack to
# another thread costs tens of microseconds (measured: stacks of 8 GEMMs of 8 MFLOP in
# all ran 2x slower split).
MIN_SPLIT_FLOPS = 1 << 24

# (get, set) symbol names of OpenBLAS's thread count: numpy's wheels (scipy-openblas,
# with and without 64-bit integers), then a plain OpenBLAS build.
_THREAD_SYMBOLS = (
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
    ("scipy_openblas_get_num_threads", "scipy_openblas_set_num_threads"),
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)


def _loaded_openblas():
    """Paths of the OpenBLAS libraries loaded in this process, numpy's own first."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
    except OSError:
        return []
    numpy_libs = os.path.realpath(os.path.join(os.path.dirname(np.__file__), os.pardir))
    return sorted((p for p in paths if p.startswith("/")),
                  key=lambda p: not os.path.realpath(p).startswith(numpy_libs))


def _openblas_thread_functions():
    """(get_threads, set_threads) ctypes functions of numpy's OpenBLAS, or None."""
    for path in _loaded_openblas():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        for get_name, set_name in _THREAD_SYMBOLS:
            if hasattr(library, get_name) and hasattr(library, set_name):
                get_threads, set_threads = getattr(library, get_name), getattr(library, set_name)
                get_threads.restype, get_threads.argtypes = ctypes.c_int, []
                set_threads.restype, set_threads.argtypes = None, [ctypes.c_int]
                return get_threads, set_threads
    return None


class StackedGemm:
    """``matmul(a, b, out)`` for stacks of GEMMs (see the module docstring)."""

    def __init__(self):
        self._threads = None  # found on first use, after numpy has loaded its BLAS
        self._pool = None
        self._pool_workers = 0
        # One split at a time: two would each save the other's thread setting of 1 and
        # could leave OpenBLAS there. A caller that finds the lock taken runs unsplit.
        self._lock = threading.Lock()

    def matmul(self, a, b, out):
        """out = a @ b for a (S, M, K), b (S, K, N) and a C-contiguous out (S, M, N)."""
        threads = self._blas_threads()
        flops = 2 * out.size * a.shape[-1]
        if threads < 2 or len(out) < 2 or flops < MIN_SPLIT_FLOPS:
            return np.matmul(a, b, out=out)
        if not self._lock.acquire(blocking=False):
            return np.matmul(a, b, out=out)
        get_threads, set_threads = self._threads
        try:
            set_threads(1)
            try:
                count = min(threads, len(out))
                bounds = [len(out) * part // count for part in range(count + 1)]
                spans = [(bounds[part], bounds[part + 1]) for part in range(count)]
                futures = [self._executor(threads).submit(np.matmul, a[lo:hi], b[lo:hi],
                                                          out=out[lo:hi])
                           for lo, hi in spans[1:]]
                try:
                    lo, hi = spans[0]
                    np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi])
                finally:
                    for future in futures:
                        future.result()
            finally:
                set_threads(threads)
        finally:
            self._lock.release()
        return out

    def _blas_threads(self):
        if self._threads is None:
            self._threads = _openblas_thread_functions() or ()
        return self._threads[0]() if self._threads else 1

    def _executor(self, threads):
        """Worker threads for all parts of a split but the caller's own."""
        if self._pool_workers != threads - 1:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="tinyunet-gemm")
            self._pool_workers = threads - 1
        return self._pool
