"""How the CPU kernels are compiled: each twice, parallel and serial.

Importing this module starts numba's thread pool as tinyunet's runtime sets it up
(runtime.start_thread_pool), before any kernel runs.
"""

from __future__ import annotations

import types

from numba import njit

from . import runtime

runtime.start_thread_pool()


def kernel(fastmath=False):
    """Compile a kernel twice: parallel (the dispatcher returned) and serial (``.serial``).

    Handing a call to numba's thread pool costs tens of microseconds when its workers
    have gone to sleep (see runtime.start_thread_pool). A small call is done sooner by
    the calling thread alone, so ``runtime.run`` sends calls under
    ``runtime.PARALLEL_MIN_ELEMENTS`` to the serial twin, a copy of the function with
    its own name and so its own cache file.
    """

    def compile_both(function):
        parallel = njit(parallel=True, cache=True, nogil=True, fastmath=fastmath)(function)
        twin = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                                  function.__defaults__, function.__closure__)
        twin.__qualname__ = function.__qualname__ + "_serial"
        parallel.serial = njit(cache=True, nogil=True, fastmath=fastmath)(twin)
        return parallel

    return compile_both
