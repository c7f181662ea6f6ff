"""Benchmarks of tinyunet against its own backends and, when installed, PyTorch.

    python -m benchmarks.ops          # per-op forward/backward, GFLOP/s, % of sgemm
    python -m benchmarks.train_step   # U-Net training steps (configs A, B, C) vs PyTorch
    python -m benchmarks.real_data --data DIR  # real microscopy: tinyunet vs PyTorch vs Otsu

Each writes its own section of benchmarks/RESULTS.md. The timings of ops and train_step
are medians over repeats that interleave the competitors, so machine noise hits all of
them alike; real_data times one training run of each method, one after another.
"""

# First, before numpy, as a program using tinyunet would: tinyunet sets up OpenBLAS's
# threads when it is imported before numpy (see tinyunet/__init__.py).
import tinyunet  # noqa: E402, F401
from tinyunet.memory import keep_freed_memory

# As the tinyunet command does. It is a setting of the process; every benchmark process
# makes it (PyTorch's child processes too), and RESULTS.md
# says whether it was made.
MALLOC_KEEPS_FREED_MEMORY = keep_freed_memory()
