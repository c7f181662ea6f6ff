"""Shared helpers of the benchmarks: timing, machine facts, sgemm peak, RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import MALLOC_KEEPS_FREED_MEMORY

RESULTS = Path(__file__).with_name("RESULTS.md")


def import_torch(threads: int | None = None):
    """PyTorch (with ``threads`` intra-op threads unless None), or None when it is not
    installed."""
    try:
        import torch
    except ImportError:
        return None
    if threads is not None:
        torch.set_num_threads(threads)
    return torch


class PeerProcess:
    """A competitor (PyTorch) run in a child process: ``python -m`` with ``module_args``,
    whose side is ``serve_peer``.

    tinyunet's numba kernels run on GNU OpenMP told to wait passively after a short
    spin, and a PyTorch imported into the same process would share that runtime and
    its settings (its steps ran 15-50% slower so), or, imported first, would leave our
    kernels on numba's slower workqueue pool. Here each framework keeps its own. The
    child runs one call per request and reports its own time, so the pipe is not timed;
    while one process runs, the other waits on the pipe, so turns still alternate, as
    in one process.
    """

    REPLY = "tinyunet-peer-reply "  # marks the child's answers among anything it prints

    def __init__(self, module_args: list[str], env: dict | None = None):
        """``env``: the child's whole environment (None: this process's)."""
        self.child = subprocess.Popen([sys.executable, "-m", *module_args],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True, bufsize=1, env=env)
        self.label = self._ask("label")

    def _ask(self, request: str) -> str:
        self.child.stdin.write(request + "\n")
        for line in self.child.stdout:
            if line.startswith(self.REPLY):
                return line[len(self.REPLY):].strip()
            print(f"PyTorch peer: {line.rstrip()}", file=sys.stderr)
        raise RuntimeError(f"PyTorch peer process ended (exit code {self.child.wait()})")

    def run(self, request: str):
        """A zero-argument callable for ``interleaved``: one call of ``request`` in the
        child, its seconds left in ``last_seconds``."""

        def call():
            call.last_seconds = float(self._ask(request))

        return call

    def close(self):
        self.child.stdin.close()
        try:
            self.child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.child.kill()
            self.child.wait()


def serve_peer(calls: dict, label: str):
    """The child's side of PeerProcess: answer "label", or time one call of
    ``calls[request]``, per line of stdin until it closes."""
    for request in sys.stdin:
        request = request.strip()
        if request == "label":
            print(PeerProcess.REPLY + label, flush=True)
            continue
        start = time.perf_counter()
        calls[request]()
        print(PeerProcess.REPLY + repr(time.perf_counter() - start), flush=True)


def torch_label(torch, where: str) -> str:
    return f"{torch.__version__}, {torch.get_num_threads()} threads, {where}"


def compute_threads() -> int:
    """Threads our numba kernels use (NUMBA_NUM_THREADS, else the core count)."""
    try:
        import numba

        import tinyunet as tu

        # Load the backend (and its choice of numba threading layer) before numba's
        # thread pool is first started by get_num_threads.
        tu.get_backend("numba")
        return numba.get_num_threads()
    except ImportError:
        return os.cpu_count() or 1


# Seconds of rest when the competitor changes. Thread pools keep spinning for a while
# after their last task (PyTorch's OpenMP threads up to a few ms; OpenBLAS's for about
# 0.1 s unless OPENBLAS_THREAD_TIMEOUT is set, as tinyunet does), which slows whichever
# competitor runs next. A long rest is no better: on this VM an idle core takes 10-50 ms
# to come back, and that lands in the next calls (measured: a 2 ms transposed-conv
# backward took 24 ms after 0.2 s of rest, 1.4 ms after 0.02 s, with the same ranges
# for PyTorch's kernels).
REST = 0.02


def interleaved(runs: dict, repeats: int, warmup: int = 1) -> dict:
    """Time each zero-argument callable in ``runs``, round-robin, ``repeats`` times.

    Returns name -> sorted list of seconds. Round-robin order means a noisy moment on
    a shared machine slows all competitors, not just one. Each turn rests (``REST``),
    makes one untimed call and then times the next one, back to back, as calls run in
    a training loop: a call right after a rest finds its thread pools asleep and runs
    up to 3x slower (measured on a 3 ms conv), which no loop of steps ever sees.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(REST)
            run()
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            # A competitor in another process times itself (no pipe latency counted).
            times[name].append(getattr(run, "last_seconds", elapsed))
    return {name: sorted(values) for name, values in times.items()}


def median(values):
    return statistics.median(values)


def sgemm_gflops(size: int = 1024, repeats: int = 7) -> float:
    """Median GFLOP/s of a float32 size^3 GEMM in numpy (BLAS), measured now."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    seconds = interleaved({"sgemm": lambda: a @ b}, repeats)["sgemm"]
    return 2 * size**3 / median(seconds) / 1e9


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_lines(threads: int, torch_label: str | None) -> list[str]:
    """Markdown bullet lines describing the machine and the software; ``torch_label``
    says which PyTorch ran and how (None: not installed)."""
    import numba

    blas = "unknown"
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]["name"]
    except Exception:  # noqa: BLE001 - only a label; older numpy has no mode="dicts"
        pass
    env = ", ".join(f"{k}={os.environ[k]}" for k in
                    ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")
                    if k in os.environ) or "none set"
    return [
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; {platform.system()} "
        f"{platform.release()}",
        f"- Python {platform.python_version()}, numpy {np.__version__} ({blas}), "
        f"numba {numba.__version__} (threading layer {_threading_layer()})",
        "- PyTorch: " + (torch_label or "not installed"),
        f"- Threads: {threads} for numba kernels and PyTorch; thread env vars: {env}",
        "- malloc: " + ("keeps freed memory for reuse (`tinyunet.memory.keep_freed_memory`, "
                        "in every benchmark process)" if MALLOC_KEEPS_FREED_MEMORY
                        else "glibc's defaults (or not glibc)"),
        f"- Command: `python -m {' '.join([_module_name(), *sys.argv[1:]])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}",
    ]


def _threading_layer() -> str:
    import numba
    from tinyunet.kernels.cpu import jit, runtime  # noqa: F401  (jit starts the pool)

    if not runtime.OPENMP_WAITS_PASSIVELY:
        return numba.threading_layer()
    spins = runtime.OPENMP_SPINCOUNT_IN_EFFECT
    return numba.threading_layer() + ", GNU OpenMP waiting passively" + (
        f" after {spins} spins (GOMP_SPINCOUNT)" if spins and spins != "0" else "")


def _module_name() -> str:
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).stem


def write_section(name: str, body: str):
    """Replace (or append) the section ``name`` of RESULTS.md, keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by the benchmarks themselves; regenerate with the "
        "commands below.\n\n")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + "\n" + block
    RESULTS.write_text(text)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
