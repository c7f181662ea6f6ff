"""How the CPU backends' work runs on the machine: threads, BLAS and memory.

Process-wide settings, gathered here:

* OpenBLAS's idle threads sleep at once (``set_openblas_thread_timeout``, from
  ``import tinyunet``);
* numba's thread pool: GNU OpenMP told to wait passively after a short spin
  (``start_thread_pool``, when the CPU kernels are first imported);
* small kernel calls run serially on the calling thread (``PARALLEL_MIN_ELEMENTS``,
  ``run``), small GEMMs in numpy's matmul (``MIN_PARALLEL_FLOPS``);
* glibc's malloc keeps freed memory for the next step (``keep_freed_memory``, called by
  the ``tinyunet`` command and the benchmarks).

Only the standard library is imported here at module level, so ``import tinyunet``
works with numpy alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# After each GEMM, OpenBLAS's idle threads spin for up to 2**28 cycles over the cores
# that numba's next parallel kernel needs (the numpy backend's GEMMs, and numpy's
# matmul where blas.gemm falls back to it, run on OpenBLAS's threads). A timeout of
# 2**4 cycles puts them to sleep at once.
OPENBLAS_THREAD_TIMEOUT = "4"


def set_openblas_thread_timeout() -> None:
    """Set OPENBLAS_THREAD_TIMEOUT unless the user did. OpenBLAS reads the variable when
    it loads, so this works only before numpy is imported."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)


def _openmp_loaded():
    """Whether this process has loaded an OpenMP runtime already (GNU's, LLVM's or
    Intel's; PyTorch, for one, brings GNU's)."""
    try:
        with open("/proc/self/maps") as maps:
            return any(name in line for line in maps
                       for name in ("libgomp", "libomp.so", "libiomp5"))
    except OSError:
        return True  # cannot tell: assume so


# Whether this module started numba's pool on GNU OpenMP told to wait passively, and
# the GOMP_SPINCOUNT that libgomp then read (None: libgomp's default for the policy).
OPENMP_WAITS_PASSIVELY = False
OPENMP_SPINCOUNT_IN_EFFECT = None
# How long GNU OpenMP's idle workers spin before they sleep, in libgomp's units
# (GOMP_SPINCOUNT: iterations of a pause loop; 10^5 is a few milliseconds). Long enough
# that a step's back-to-back kernel calls find their workers awake. See
# start_thread_pool.
OPENMP_SPIN_COUNT = 100_000


def start_thread_pool():
    """Pick numba's threading layer and start its threads.

    A training step makes a few hundred parallel calls, many straight after another,
    so how the pool's idle workers wait matters: waking a sleeping worker costs tens of
    microseconds, a spinning one about one. The GEMMs run on this pool too
    (tinyunet/backends/numba/blas.py), so no other pool of threads needs the cores
    while these workers wait, and they spin for a few milliseconds
    (GOMP_SPINCOUNT=OPENMP_SPIN_COUNT) before they sleep; sleeping, GNU OpenMP's
    workers still wake faster than those of numba's own workqueue pool. So on Linux
    numba gets the OpenMP layer, falling back to workqueue where libgomp is missing,
    with OMP_WAIT_POLICY=passive and GOMP_SPINCOUNT set only while the pool starts:
    libgomp reads them once, when it loads. They then hold for the process's libgomp,
    which a library loaded later may share (PyTorch's CPU build does, and runs slower
    waiting passively). Where an OpenMP runtime is already loaded, its wait policy is
    set, so workqueue again; a layer, wait policy or spin count the user set
    (NUMBA_THREADING_LAYER, OMP_WAIT_POLICY, GOMP_SPINCOUNT) is left alone, and a
    passive policy the user set gets no spinning. If numba's pool was started before
    the kernels are first imported, its layer stays.
    """
    import numba

    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    policy = os.environ.get("OMP_WAIT_POLICY")
    if (not sys.platform.startswith("linux") or _openmp_loaded()
            or (policy or "passive").lower() != "passive"):
        numba.config.THREADING_LAYER = "workqueue"
        return
    numba.config.THREADING_LAYER = "default"
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    settings = {"OMP_WAIT_POLICY": "passive"}
    if policy is None and "GOMP_SPINCOUNT" not in os.environ:
        settings["GOMP_SPINCOUNT"] = str(OPENMP_SPIN_COUNT)
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    spincount = os.environ.get("GOMP_SPINCOUNT")
    try:
        numba.get_num_threads()  # starts the pool, loading libgomp now
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value
    global OPENMP_WAITS_PASSIVELY, OPENMP_SPINCOUNT_IN_EFFECT
    OPENMP_WAITS_PASSIVELY = numba.threading_layer() == "omp"
    OPENMP_SPINCOUNT_IN_EFFECT = spincount if OPENMP_WAITS_PASSIVELY else None


# Kernels on fewer elements than this run serially on the calling thread (each kernel's
# ``.serial`` twin, see jit.py): handing them to the pool costs more than they take,
# most of all when its workers have gone to sleep. With the workers spinning between
# calls, the break-even is low.
PARALLEL_MIN_ELEMENTS = 1 << 14


def run(kernel, elements, *args):
    """Call a kernels/cpu kernel: in parallel, or serially when ``elements`` is too few."""
    return (kernel if elements >= PARALLEL_MIN_ELEMENTS else kernel.serial)(*args)


# blas.gemm calls doing less arithmetic than this (2^17 multiply-adds) go to numpy's
# matmul, which costs less to call than a hand-off to the pool, and which OpenBLAS then
# runs on the calling thread alone (it splits no GEMM under 2^18 multiply-adds).
MIN_PARALLEL_FLOPS = 1 << 18


# ---- malloc ----------------------------------------------------------------------------
# Every training step allocates the same multi-MB arrays (activations, gradients) and
# frees them again. By default glibc's malloc gives large freed blocks back to the OS
# (munmap, or trimming the top of the heap), so the next step faults every 4 KiB page
# back in and the kernel zeroes it. keep_freed_memory() has malloc serve large arrays
# from its heap and keep what is freed, so a step reuses the last step's memory and the
# peak resident set stays what a step holds. It is a setting of the whole process:
# the library never makes it on import; the tinyunet command and the benchmarks call
# it. It is skipped where malloc is not glibc's, and when MALLOC_TRIM_THRESHOLD_ or
# MALLOC_MMAP_THRESHOLD_ is set (glibc then follows those).

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Arrays up to this size come from the heap (glibc's default is 128 KiB, rising with use
# up to 32 MiB); what is freed at the top of the heap is kept up to KEEP_FREED_BYTES.
HEAP_ARRAYS_UP_TO = 1 << 30
KEEP_FREED_BYTES = 1 << 30

USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True if the setting was made."""
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, HEAP_ARRAYS_UP_TO)
                and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
