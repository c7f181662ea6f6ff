"""Keep freed memory in the process, so that training steps stop paying page faults.

A setting of the whole process, so the library never makes it on import: the
``tinyunet`` command and the benchmarks call ``keep_freed_memory()``, and a program of
your own may. It lives with the other process settings in tinyunet.kernels.cpu.runtime.
"""

from .kernels.cpu.runtime import keep_freed_memory

__all__ = ["keep_freed_memory"]
