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
program starts runs on one thread, and one split runs at a time (a second caller runs
unsplit meanwhile). ``matmul`` is numpy's own where numpy's OpenBLAS cannot be told
apart (not found in /proc/self/maps, as on macOS and Windows; another BLAS; two
candidates outside numpy's wheel), where it is an OpenMP build (whose thread setting
is per calling thread) or where it is set to one thread. A forked child starts with
a fresh pool and lock, and with the parent's thread setting if the fork came mid-split.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np

# Stacks doing less arithmetic than this stay one numpy call: handing half a stack to
# another thread costs tens of microseconds (measured: stacks of 8 GEMMs of 8 MFLOP in
# all ran 2x slower split).
MIN_SPLIT_FLOPS = 1 << 24

# Symbol name stems of OpenBLAS's thread functions, by build: numpy's wheels
# (scipy-openblas with 64-bit integers, then without), then a plain OpenBLAS.
_PREFIXES_SUFFIXES = (("scipy_openblas_", "64_"), ("scipy_openblas_", ""),
                      ("openblas_", "64_"), ("openblas_", ""))
_PTHREADS_BUILD = 1  # what openblas_get_parallel() returns for a pthreads build


def _loaded_openblas():
    """The OpenBLAS library numpy uses, as a path: the one in numpy's wheel folder
    (numpy.libs), else the only OpenBLAS loaded; None when that is not clear."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps
                            if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    except OSError:
        return None
    wheel_libs = os.path.realpath(os.path.join(os.path.dirname(np.__file__), os.pardir,
                                               "numpy.libs"))
    own = [p for p in paths if os.path.realpath(p).startswith(wheel_libs + os.sep)]
    candidates = own or paths
    return candidates[0] if len(candidates) == 1 else None


def _openblas_thread_functions():
    """(get_threads, set_threads) of numpy's OpenBLAS when it is a pthreads build."""
    path = _loaded_openblas()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    for prefix, suffix in _PREFIXES_SUFFIXES:
        names = [f"{prefix}{stem}{suffix}"
                 for stem in ("get_num_threads", "set_num_threads", "get_parallel")]
        if all(hasattr(library, name) for name in names):
            get_threads, set_threads, get_parallel = (getattr(library, n) for n in names)
            get_threads.restype, get_threads.argtypes = ctypes.c_int, []
            get_parallel.restype, get_parallel.argtypes = ctypes.c_int, []
            set_threads.restype, set_threads.argtypes = None, [ctypes.c_int]
            if get_parallel() != _PTHREADS_BUILD:
                return None
            return get_threads, set_threads
    return None


class _Splitter:
    """The process's split machinery: found BLAS functions, worker pool and lock."""

    def __init__(self):
        self.threads = None  # (get, set), found on first use, after numpy loaded BLAS
        self.pool = None
        self.pool_workers = 0
        self.lock = threading.Lock()
        self.saved_threads = None  # OpenBLAS's setting while a split holds it at 1

    def blas_threads(self):
        if self.threads is None:
            self.threads = _openblas_thread_functions() or ()
        return self.threads[0]() if self.threads else 1

    def executor(self, threads):
        """Worker threads for all parts of a split but the caller's own."""
        if self.pool_workers != threads - 1:
            if self.pool is not None:
                self.pool.shutdown(wait=False)
            self.pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="tinyunet-gemm")
            self.pool_workers = threads - 1
        return self.pool

    def after_fork_in_child(self):
        # The parent's pool threads do not exist here, and its lock may be held.
        if self.saved_threads is not None and self.threads:
            self.threads[1](self.saved_threads)
        self.pool, self.pool_workers = None, 0
        self.lock = threading.Lock()
        self.saved_threads = None


_splitter = _Splitter()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _splitter.after_fork_in_child())


def matmul(a, b, out):
    """out = a @ b for a (S, M, K), b (S, K, N) and out (S, M, N), each of whose
    matrices is C-contiguous."""
    threads = _splitter.blas_threads()
    flops = 2 * out.size * a.shape[-1]
    if threads < 2 or len(out) < 2 or flops < MIN_SPLIT_FLOPS:
        return np.matmul(a, b, out=out)
    if not _splitter.lock.acquire(blocking=False):
        return np.matmul(a, b, out=out)
    try:
        _split(a, b, out, threads)
    finally:
        _splitter.lock.release()
    return out


def _split(a, b, out, threads):
    """Run contiguous parts of the stack on ``threads`` threads, OpenBLAS at 1 thread."""
    set_threads = _splitter.threads[1]
    count = min(threads, len(out))
    bounds = [len(out) * part // count for part in range(count + 1)]
    spans = [(bounds[part], bounds[part + 1]) for part in range(count)]
    _splitter.saved_threads = threads
    set_threads(1)
    try:
        pool = _splitter.executor(threads)
        futures = [pool.submit(np.matmul, a[lo:hi], b[lo:hi], out=out[lo:hi])
                   for lo, hi in spans[1:]]
        try:
            lo, hi = spans[0]
            np.matmul(a[lo:hi], b[lo:hi], out=out[lo:hi])
        finally:
            # Every part has ended before the call returns or raises: none may still
            # write into ``out`` (often a reused scratch buffer) afterwards.
            wait(futures)
            for future in futures:
                future.result()
    finally:
        set_threads(threads)
        _splitter.saved_threads = None
