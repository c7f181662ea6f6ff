"""GEMMs on numba's thread pool: each of its threads calls single-threaded BLAS on a part.

Shapes: ``gemm(a, b, out)`` computes out = a @ b (or out += a @ b) for a (S, M, K) or
(M, K), b (S, K, N) or (K, N) and out (S, M, N) or (M, N); a 2-D operand serves every
matrix of the stack. An operand may be a transposed view (``x.T``) or a view with a row
stride (``v[:, :c]``), as BLAS takes them; out must have unit column stride.

Why not numpy's matmul: the numba backend alternates GEMMs with its parallel kernels
many times a step. OpenBLAS has threads of its own, so each GEMM would wake OpenBLAS's
sleeping threads and each kernel after it numba's, tens of microseconds a wake; and
OpenBLAS splits every GEMM over its threads, which on the U-Net's small matrices mostly
wait for each other. Here the work of a call goes to the threads of numba's pool,
which then run everything, so its workers can spin between calls
(runtime.OPENMP_SPIN_COUNT) without stealing cores from BLAS: each thread takes whole
matrices of the stack, or, where the stack does not divide evenly, a part of each
matrix (gemm_kernels.gemm_parts).

OpenBLAS is held to one thread for the length of a call and its setting restored after.
That setting is process-wide: while a call runs, a GEMM that another thread of the
program starts runs on one thread, and one call at a time runs this way (a second
caller meanwhile gets numpy's matmul). Calls use min(numba's threads, OpenBLAS's
setting), so NUMBA_NUM_THREADS and OPENBLAS_NUM_THREADS both keep their meaning.

numpy's matmul is used instead in a forked child, and where numpy's OpenBLAS cannot be
told apart (not found in /proc/self/maps, as on macOS and Windows; another BLAS; two
candidates outside numpy's wheel), is an OpenMP build (whose thread setting is per
calling thread) or lacks the 64-bit-integer cblas GEMMs; and for calls BLAS cannot take
as they are (other dtypes, overlapping or reversed operands) or too small to share.
"""

from __future__ import annotations

import ctypes
import os
import threading

import numba
import numpy as np

from ...kernels.cpu import gemm as gemm_kernels
from ...kernels.cpu import runtime
from . import policy

# Symbol name stems of OpenBLAS's functions with 64-bit integers, by build: numpy's
# wheels (scipy-openblas64), then a plain OpenBLAS built with INTERFACE64 and a suffix.
_PREFIXES_SUFFIXES = (("scipy_openblas_", "64_", "scipy_cblas_", "64_"),
                      ("openblas_", "64_", "cblas_", "64_"))
_PTHREADS_BUILD = 1  # what openblas_get_parallel() returns for a pthreads build
# The names kernels/cpu/gemm.py declares cblas_sgemm and cblas_dgemm by.
_KERNEL_SYMBOLS = {"sgemm": "tinyunet_cblas_sgemm", "dgemm": "tinyunet_cblas_dgemm"}


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


def _find_openblas():
    """(get_threads, set_threads) of numpy's OpenBLAS when it is a pthreads build with
    64-bit-integer cblas GEMMs, whose addresses are then registered for gemm_kernels."""
    path = _loaded_openblas()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)
    except OSError:
        return None
    for prefix, suffix, cblas_prefix, cblas_suffix in _PREFIXES_SUFFIXES:
        names = [f"{prefix}{stem}{suffix}"
                 for stem in ("get_num_threads", "set_num_threads", "get_parallel")]
        gemms = {kind: f"{cblas_prefix}{kind}{cblas_suffix}" for kind in _KERNEL_SYMBOLS}
        if not all(hasattr(library, name) for name in [*names, *gemms.values()]):
            continue
        get_threads, set_threads, get_parallel = (getattr(library, n) for n in names)
        get_threads.restype, get_threads.argtypes = ctypes.c_int, []
        get_parallel.restype, get_parallel.argtypes = ctypes.c_int, []
        set_threads.restype, set_threads.argtypes = None, [ctypes.c_int]
        if get_parallel() != _PTHREADS_BUILD:
            return None
        import llvmlite.binding

        for kind, name in gemms.items():
            address = ctypes.cast(getattr(library, name), ctypes.c_void_p).value
            llvmlite.binding.add_symbol(_KERNEL_SYMBOLS[kind], address)
        return get_threads, set_threads
    return None


class _Blas:
    """The process's BLAS access: its thread functions, found on first use, and a lock."""

    def __init__(self):
        self.threads = None  # (get, set), or () where gemm falls back to numpy
        self.lock = threading.Lock()
        self.saved_threads = None  # OpenBLAS's setting while a call holds it at 1

    def thread_functions(self):
        if self.threads is None:
            self.threads = _find_openblas() or ()
        return self.threads

    def after_fork_in_child(self):
        # The lock may have been held by a thread that does not exist here. A forked
        # child gets numpy's matmul: GNU OpenMP ends a child that starts a parallel
        # region after its parent ran one.
        if self.saved_threads is not None and self.threads:
            self.threads[1](self.saved_threads)
        self.threads = ()
        self.lock = threading.Lock()
        self.saved_threads = None


_blas = _Blas()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _blas.after_fork_in_child())


def available():
    """Whether gemm runs on numba's threads here (else it is numpy's matmul)."""
    return bool(_blas.thread_functions())


def _layout(matrices):
    """(cblas transpose flag, leading dimension) of the last two axes of an operand, or
    None where BLAS cannot read them in place."""
    rows, cols = matrices.shape[-2:]
    size = matrices.itemsize
    row_step, col_step = matrices.strides[-2:]
    # A single column's or row's other stride is free: choose it so the layout fits.
    if cols == 1:
        col_step = size
    if rows == 1:
        row_step = max(cols, 1) * size if col_step == size else size
    if col_step == size and row_step % size == 0 and row_step >= max(cols, 1) * size:
        return gemm_kernels.CBLAS_NO_TRANS, row_step // size
    if row_step == size and col_step % size == 0 and col_step >= max(rows, 1) * size:
        return gemm_kernels.CBLAS_TRANS, col_step // size
    return None


def _stack_step(operand, stack):
    """Bytes between an operand's matrices; 0 for a 2-D operand shared by the stack."""
    if operand.ndim == 2 or operand.shape[0] == 1 or stack == 1:
        return 0
    return operand.strides[0] if operand.strides[0] > 0 else None


def _shapes_match(a, b, out):
    """Whether out = a @ b fits the shapes gemm takes (numpy's matmul judges the rest)."""
    if out.ndim not in (2, 3) or a.ndim not in (2, out.ndim) or b.ndim not in (2, out.ndim):
        return False
    stacks_fit = all(x.ndim == 2 or x.shape[0] in (1, out.shape[0]) for x in (a, b))
    return (stacks_fit and a.shape[-1] == b.shape[-2]
            and out.shape[-2:] == (a.shape[-2], b.shape[-1]))


def _matrices_overlap(out, step, ldc):
    """Whether out's matrices share memory (threads would then write the same values)."""
    rows, cols = out.shape[-2:]
    return 0 < step < ((rows - 1) * ldc + cols) * out.itemsize


def _plan(a, b, out, min_flops):
    """gemm_parts's arguments for out = a @ b other than the addresses, beta and the
    parts: (double, a_step, b_step, c_step, stack, m, n, k, trans_a, lda, trans_b, ldb,
    ldc); or None where the call goes to numpy's matmul (also when it does fewer than
    ``min_flops``). It depends only on the operands' shapes, strides and dtypes."""
    if not _shapes_match(a, b, out):
        return None
    stack = out.shape[0] if out.ndim == 3 else 1
    m, k = a.shape[-2:]
    n = b.shape[-1]
    if 2 * stack * m * n * k < min_flops:
        return None
    layouts = [_layout(x) for x in (a, b, out)]
    steps = [_stack_step(x, stack) for x in (a, b, out)]
    if (out.dtype not in (np.float32, np.float64)
            or a.dtype != out.dtype or b.dtype != out.dtype or 0 in (m, n, k, stack)
            or None in layouts or None in steps or layouts[2][0] != gemm_kernels.CBLAS_NO_TRANS
            or _matrices_overlap(out, steps[2], layouts[2][1])):
        return None
    (trans_a, lda), (trans_b, ldb), (_, ldc) = layouts
    return (out.dtype == np.float64, *steps, stack, m, n, k, trans_a, lda, trans_b, ldb, ldc)


# Plans by the operands' shapes, strides and dtypes, and runtime.MIN_PARALLEL_FLOPS: a
# U-Net makes the same few dozen calls every step, and a lookup costs a fraction of
# working a plan out.
_plans: dict = {}
_MAX_PLANS = 4096  # then start again: sizes that keep changing must not grow it forever


def _numpy_gemm(a, b, out, accumulate):
    if accumulate:
        out += np.matmul(a, b)
    else:
        np.matmul(a, b, out=out)
    return out


def gemm(a, b, out, accumulate=False):
    """out = a @ b, or out += a @ b if ``accumulate``; returns out. See the module
    docstring for shapes."""
    functions = _blas.thread_functions()
    if not functions or not all(isinstance(x, np.ndarray) for x in (a, b, out)):
        return _numpy_gemm(a, b, out, accumulate)
    min_flops = runtime.MIN_PARALLEL_FLOPS
    key = (a.shape, a.strides, a.dtype, b.shape, b.strides, b.dtype, out.shape, out.strides,
           out.dtype, min_flops)
    plan = _plans.get(key, False)
    if plan is False:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = _plan(a, b, out, min_flops)
    if (plan is None or not out.flags.writeable or np.may_share_memory(out, a)
            or np.may_share_memory(out, b)):
        return _numpy_gemm(a, b, out, accumulate)
    # Outside the lock: a new kind of array compiles (or loads) gemm_kernels.address first.
    addresses = gemm_kernels.address(a), gemm_kernels.address(b), gemm_kernels.address(out)
    if not _blas.lock.acquire(blocking=False):
        return _numpy_gemm(a, b, out, accumulate)
    get_threads, set_threads = functions
    try:
        saved = get_threads()
        parts = min(saved, numba.get_num_threads())
        run = gemm_kernels.gemm_parts if parts > 1 else gemm_kernels.gemm_parts.serial
        _blas.saved_threads = saved
        set_threads(1)
        try:
            double, a_step, b_step, c_step, *sizes_and_layouts = plan
            run(double, addresses[0], a_step, addresses[1], b_step, addresses[2], c_step,
                *sizes_and_layouts, 1.0 if accumulate else 0.0, parts)
        finally:
            set_threads(saved)
            _blas.saved_threads = None
    finally:
        _blas.lock.release()
    return out


def add_gram(a, b, out):
    """out += a @ b^T for 2-D a (I, T), b (J, T) and out (I, J): stacked_gram where the
    policy says it wins, BLAS elsewhere and where a or b is a view with gaps (a band of
    rows of an image)."""
    if (policy.use_stacked_gram(len(a), len(b), a.shape[1])
            and a.flags.c_contiguous and b.flags.c_contiguous):
        runtime.run(gemm_kernels.stacked_gram, a.size + b.size, a[None], b[None], True, out[None])
    else:
        gemm(a, b.T, out, accumulate=True)
