"""GPU benchmark: the cuda backend's kernels and training step, and PyTorch on the same GPU.

    python -m benchmarks.gpu [--configs A B C] [--no-write]
    NUMBA_ENABLE_CUDASIM=1 python -m benchmarks.gpu --smoke      # no GPU: a tiny smoke run

Per-op figures time the backend's kernels (im2col + cuBLAS GEMM + col2im for convs,
max-pool forward/backward, ReLU) with CUDA events, as the median of many runs after a
warm-up. The training step is the one of benchmarks.train_step (configs A, B, C): zero_grad,
forward, soft-Dice loss, backward, SGD-momentum step, timed until the GPU is idle.
When PyTorch with CUDA is installed, the same ops and model run in the same process,
alternating with ours, and the ratio (PyTorch time / ours) is printed.

Under the simulator (``--smoke``) the shapes are tiny and the timings mean nothing;
it only proves that the script and every kernel launch run. It writes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from .common import median, table, write_section
from .train_step import CONFIGS, Config, tinyunet_runs, torch_runs

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") == "1"
SMOKE_CONFIG = Config(depth=2, base=2, batch=1, size=8, repeats=2)


def gpu_timer(torch=None):
    """Seconds of one call: CUDA events on a GPU, the host clock when simulated."""
    if SIMULATED:
        def host(run):
            start = time.perf_counter()
            run()
            return time.perf_counter() - start

        return host
    import cupy

    def events(run):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        run()
        end.record()
        end.synchronize()
        if torch is not None:
            torch.cuda.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3

    return events


def timed(runs: dict, repeats: int, timer) -> dict:
    """name -> median seconds, alternating the runs, after one warm-up call each."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timer(run))
    return {name: median(values) for name, values in times.items()}


def op_runs(backend, host):
    """Zero-argument closures of the kernels behind one U-Net level, on host arrays
    ``host`` = (x, w, dy) moved to the GPU."""
    from tinyunet.backends import ConvGeometry, PoolGeometry

    x, w, dy = (backend.asarray(a) for a in host)
    size = x.shape[-1]
    same = ConvGeometry((1, 1), (1, 1, 1, 1))
    pool = PoolGeometry((2, 2), (2, 2))
    pooled, argmax = backend.max_pool2d(x, pool)
    dpooled = backend.asarray(host[0][:, :, ::2, ::2].copy())
    return {
        "conv3x3 forward": lambda: backend.conv2d(x, w, same),
        "conv3x3 grad input": lambda: backend.conv2d_grad_input(dy, w, same, (size, size)),
        "conv3x3 grad weight": lambda: backend.conv2d_grad_weight(dy, x, same, (3, 3)),
        "max-pool forward": lambda: backend.max_pool2d(x, pool),
        "max-pool backward": lambda: backend.max_pool2d_backward(dpooled, argmax, x.shape,
                                                                 pool),
        "relu": lambda: backend.relu(x),
    }


def torch_op_runs(torch, host):
    """The same ops in PyTorch (cuDNN), keyed as in op_runs."""
    x, w, dy = (torch.from_numpy(a).cuda() for a in host)
    functional, grad = torch.nn.functional, torch.nn.grad
    _, argmax = functional.max_pool2d(x, 2, return_indices=True)
    dpooled = torch.from_numpy(host[0][:, :, ::2, ::2].copy()).cuda()
    return {
        "conv3x3 forward": lambda: functional.conv2d(x, w, padding=1),
        "conv3x3 grad input": lambda: grad.conv2d_input(x.shape, w, dy, padding=1),
        "conv3x3 grad weight": lambda: grad.conv2d_weight(x, w.shape, dy, padding=1),
        "max-pool forward": lambda: functional.max_pool2d(x, 2, return_indices=True),
        "max-pool backward": lambda: torch.ops.aten.max_pool2d_with_indices_backward(
            dpooled, x, [2, 2], [2, 2], [0, 0], [1, 1], False, argmax),
        "relu": lambda: torch.relu(x),
    }


def op_table(backend, torch, timer, level, repeats, rng):
    """Rows of per-op medians (ms), conv GFLOP/s, and PyTorch's times and ratios."""
    n, c, o, size = level
    host = (rng.standard_normal((n, c, size, size), dtype=np.float32),
            rng.standard_normal((o, c, 3, 3), dtype=np.float32),
            rng.standard_normal((n, o, size, size), dtype=np.float32))
    runs = {("tinyunet", name): run for name, run in op_runs(backend, host).items()}
    if torch is not None:
        runs.update({("torch", name): run for name, run in torch_op_runs(torch, host).items()})
    seconds = timed(runs, repeats, timer)
    conv_flops = 2 * n * o * c * 9 * size * size
    rows = []
    for (framework, name), ours in seconds.items():
        if framework != "tinyunet":
            continue
        rate = f"{conv_flops / ours / 1e9:.0f}" if name.startswith("conv") else ""
        row = [name, f"{ours * 1e3:.3f}", rate]
        if torch is not None:
            theirs = seconds[("torch", name)]
            row += [f"{theirs * 1e3:.3f}", f"{theirs / ours:.2f}x"]
        rows.append(row)
    header = [f"op (N, C, O, size) = {level}", "ms (median)", "conv GFLOP/s"]
    if torch is not None:
        header += ["torch ms", "speed-up vs torch"]
    return header, rows


def import_torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, few repeats, nothing written (for the simulator)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    import tinyunet as tu

    backend = tu.get_backend("cuda")
    torch = None if SIMULATED else import_torch_cuda()
    timer = gpu_timer(torch)
    repeats = 2 if args.smoke else 50
    rng = np.random.default_rng(0)

    level = (1, 2, 2, 6) if args.smoke else (8, 64, 64, 128)
    op_header, op_rows = op_table(backend, torch, timer, level, repeats, rng)
    print(table(op_header, op_rows))

    step_rows = []
    configs = {"smoke": SMOKE_CONFIG} if args.smoke else {k: CONFIGS[k] for k in args.configs}
    for name, config in configs.items():
        train_step, inference = tinyunet_runs(config, "cuda")
        runs = {"tinyunet train": train_step, "tinyunet inference": inference}
        if torch is not None:
            torch_train, torch_inference = torch_runs(config, torch, device="cuda")
            runs.update({"torch train": torch_train, "torch inference": torch_inference})
        seconds = timed(runs, config.repeats if args.smoke else 3 * config.repeats, timer)
        row = [name, f"{seconds['tinyunet train'] * 1e3:.2f}",
               f"{config.batch / seconds['tinyunet train']:.1f}",
               f"{seconds['tinyunet inference'] * 1e3:.2f}"]
        if torch is not None:
            row += [f"{seconds['torch train'] * 1e3:.2f}",
                    f"{seconds['torch train'] / seconds['tinyunet train']:.2f}x",
                    f"{seconds['torch inference'] * 1e3:.2f}",
                    f"{seconds['torch inference'] / seconds['tinyunet inference']:.2f}x"]
        step_rows.append(row)
    header = ["config", "train step ms", "img/s", "inference ms"]
    if torch is not None:
        header += ["torch train step ms", "train speed-up", "torch inference ms",
                   "inference speed-up"]
    print(table(header, step_rows))

    if args.smoke or args.no_write:
        return
    import importlib.metadata

    import cupy
    import numba

    try:  # numba's CUDA target, a package of its own in newer installs
        numba_cuda = f", numba-cuda {importlib.metadata.version('numba-cuda')}"
    except importlib.metadata.PackageNotFoundError:
        numba_cuda = ""
    device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    driver = cupy.cuda.runtime.driverGetVersion()
    peer = "PyTorch with CUDA not installed"
    if torch is not None:
        peer = (f"PyTorch {torch.__version__} with its defaults: cuDNN TF32 convs "
                f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}, cuDNN benchmark mode "
                f"{'on' if torch.backends.cudnn.benchmark else 'off'}")
    body = "\n".join([
        "## GPU (cuda backend)",
        "",
        f"- GPU: {device}, CUDA driver API {driver // 1000}.{driver % 1000 // 10}; "
        f"CuPy {cupy.__version__}, numba {numba.__version__}{numba_cuda}, numpy "
        f"{np.__version__}; "
        "tinyunet's GEMMs are CuPy's float32 cuBLAS calls (no TF32)",
        f"- Peer: {peer}",
        "- Command: `" + " ".join(["python -m benchmarks.gpu", *argv]) + "`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}; medians of CUDA-event timings, "
        f"{repeats} per op, the two frameworks alternating",
        "",
        table(op_header, op_rows),
        "",
        table(header, step_rows),
    ])
    write_section("gpu", body)
    print("wrote benchmarks/RESULTS.md (section 'gpu')")


if __name__ == "__main__":
    main()
