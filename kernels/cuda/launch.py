"""Launch sizes of the CUDA kernels, real or under Numba's simulator.

``launch_config(work)`` gives (blocks, threads) for a grid-stride kernel over ``work``
items; ``REDUCE_THREADS`` is the block size of the reductions.
"""

from __future__ import annotations

import math
import os

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
THREADS_PER_BLOCK = 256
# The simulator runs each thread as a Python thread (about 1 ms each), so it gets one
# small block; the grid-stride loops keep results identical.
SIMULATOR_THREADS = 32
# Threads of one reduction block: a power of two, fixed at compile time.
REDUCE_THREADS = 32 if SIMULATED else 128


def launch_config(work: int) -> tuple[int, int]:
    """(blocks, threads) for ``work`` independent items."""
    if SIMULATED:
        return 1, SIMULATOR_THREADS
    blocks = max(1, min(math.ceil(work / THREADS_PER_BLOCK), 65535))
    return blocks, THREADS_PER_BLOCK
