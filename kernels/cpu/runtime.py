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

# After each GEMM, OpenBLAS's idle threads spin for up to 2**28 cycles. On the numba
# backend GEMMs alternate with numba's parallel kernels, which then share the cores
# with the spinning threads (measured: a U-Net training step 20-25% slower on 2
# cores). A timeout of 2**4 cycles puts them to sleep at once.
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
# (GOMP_SPINCOUNT: iterations of a pause loop; 1000 spun for 20-30 us here, so 10^5
# for 2-3 ms). See start_thread_pool.
OPENMP_SPIN_COUNT = 100_000


def start_thread_pool():
    """Pick numba's threading layer and start its threads.

    A training step makes about 150-180 parallel calls (configs C and A), many
    straight after another, so how the pool's idle workers wait matters. Waking a
    sleeping worker cost 45 us a call on the 2-core VM of benchmarks/RESULTS.md (numba's
    own workqueue pool: 62-82 us). The GEMMs run on this pool too
    (tinyunet/backends/blas.py), so no other pool of threads needs the cores while
    these workers wait, and they spin for 2-3 ms (GOMP_SPINCOUNT=OPENMP_SPIN_COUNT)
    before they sleep. While BLAS ran on threads of its own, spinning for long stole
    its cores: 10^5 spins made A 20% slower, and 1000 (20-30 us) was the best; with the
    GEMMs on this pool, one run of benchmarks/train_step.py each (A / C speed-up over
    PyTorch): 1000 spins 1.15x / 1.08x, 10^4 1.31x / 1.35x, 3*10^4 1.23x / 1.22x, 10^5
    1.35x / 1.35x, 3*10^5 1.27x / 1.31x. Without the spin, told to sleep at once
    (OMP_WAIT_POLICY=passive), OpenMP's workers still woke faster than workqueue's
    (training steps in fresh processes, alternating, C 32-34 vs 43-48 ms, A 130-172 vs
    142-190 ms). So on Linux, where we measured it, numba gets the OpenMP layer, falling
    back to workqueue where libgomp is missing, with OMP_WAIT_POLICY=passive and
    GOMP_SPINCOUNT set only while the pool starts: libgomp reads them once, when it
    loads. They then hold for the process's libgomp, which a library loaded later may
    share (PyTorch's CPU build does: its steps ran 15-50% slower passive). Where an
    OpenMP runtime is already loaded, its wait policy is set, so workqueue again; a
    layer, wait policy or spin count the user set (NUMBA_THREADING_LAYER,
    OMP_WAIT_POLICY, GOMP_SPINCOUNT) is left alone, and a passive policy the user set
    gets no spinning. If numba's pool was started before this module is first imported,
    its layer stays.
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



# Kernels on fewer elements than this run serially on the calling thread: waking
# numba's pool (about 0.1 ms on workqueue when GEMMs run in between, 20-45 us on
# passive OpenMP once its workers sleep) costs more than they take. Measured with GEMMs
# in between, on workqueue: a ReLU of 300k float32 values ran faster serially (72 vs 103
# us), im2col of 130k inputs too, im2col of 260k faster in parallel; on OpenMP with no
# spinning, 2^16 instead of 2^18 changed nothing on C's step (40 alternated pairs) and
# 2^20 made it 13% slower. Once OpenMP's workers spun briefly (runtime.
# OPENMP_SPIN_COUNT, then 1000 spins), a call right after another found them awake:
# against 2^18, 2^16 made C's step 5.6% and A's 3.8% faster (40 and 20 alternated
# pairs); against 2^16, 2^14 C's 2.4% (A's the same), 2^12 C's 2-2.4%, A's and B's
# within 1%, 0 C's 2%. Not measured again since they spin for 2-3 ms.
PARALLEL_MIN_ELEMENTS = 1 << 14


def run(kernel, elements, *args):
    """Call a kernels/cpu kernel: in parallel, or serially when ``elements`` is too few."""
    return (kernel if elements >= PARALLEL_MIN_ELEMENTS else kernel.serial)(*args)


# Calls doing less arithmetic than this (2^17 multiply-adds) are numpy's matmul, which
# costs less to call (1 us against 6) and which OpenBLAS then runs on the calling
# thread alone (it splits no GEMM under 2^18 multiply-adds).
MIN_PARALLEL_FLOPS = 1 << 18


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
