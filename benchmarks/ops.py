"""Per-op benchmark: forward and backward of U-Net-typical layers on every CPU backend.

    python -m benchmarks.ops [--repeats 7] [--no-torch] [--no-write] [--conv-algo ALGO]

For each layer shape it times tinyunet's ``numpy`` and ``numba`` backends, PyTorch when
installed (same thread count, in a child process of its own, as in train_step), and,
for the 3x3 convs, their im2col GEMMs alone, round-robin. Conv rows report GFLOP/s of
the conv arithmetic (2*N*O*C*kH*kW*Ho*Wo per pass; backward = input + weight
gradients = 2 passes) and the percentage of a float32 GEMM measured in the same run.
The table goes into the "ops" section of benchmarks/RESULTS.md. ``--conv-algo`` forces
one conv algorithm of the numba backend's policy wherever it can run
(tinyunet.backends.numba.force_conv_algo), to compare paths on the same layers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
from functools import partial

import numpy as np

import tinyunet as tu
from tinyunet.backends import ConvGeometry, PoolGeometry

from .common import (
    PeerProcess,
    compute_threads,
    import_torch,
    interleaved,
    machine_lines,
    median,
    serve_peer,
    sgemm_gflops,
    table,
    torch_label,
    write_section,
)

# (label, N, C_in, C_out, H, W): the 3x3 'same' convs of configs A and B.
CONV3 = [
    ("A level 0, 16->16", 4, 16, 16, 128, 128),
    ("A level 0 up, 32->16", 4, 32, 16, 128, 128),
    ("A level 1, 32->32", 4, 32, 32, 64, 64),
    ("A level 2, 64->64", 4, 64, 64, 32, 32),
    ("A level 3, 128->128", 4, 128, 128, 16, 16),
    ("A bottom, 256->256", 4, 256, 256, 8, 8),
    ("B level 0, 32->32", 2, 32, 32, 256, 256),
    ("B level 0 up, 64->32", 2, 64, 32, 256, 256),
    ("B level 1, 64->64", 2, 64, 64, 128, 128),
    ("B level 2, 128->128", 2, 128, 128, 64, 64),
    ("B bottom, 512->512", 2, 512, 512, 16, 16),
]
# Issue 4's bar for conv layers with 64 or more channels: this share of the sgemm peak.
WIDE_CONV_TARGET = 0.60
# (label, N, C_in, C_out, H, W) of the input of a 2x2 stride-2 transposed conv.
UPCONV = [
    ("A up to level 0, 32->16", 4, 32, 16, 64, 64),
    ("A up to level 3, 256->128", 4, 256, 128, 8, 8),
]
POOL = [("A level 0, 16 ch", 4, 16, 128, 128)]
# The extra column of the 3x3 conv rows: their im2col GEMMs alone (im2col_gemms).
GEMMS_ALONE = "numpy GEMMs alone"


def conv3x3_runs(torch, ours, rng, n, c, o, h, w):
    """{competitor: (forward, backward)} of a 3x3 'same' conv with bias: PyTorch's if
    ``torch``, tinyunet's backends and the GEMMs alone if ``ours``."""
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    weight = rng.standard_normal((o, c, 3, 3), dtype=np.float32) * 0.1
    dy = rng.standard_normal((n, o, h, w), dtype=np.float32)
    geometry = ConvGeometry((1, 1), (1, 1, 1, 1))
    runs = {}
    if torch:
        runs["torch"] = torch_conv(torch, x, weight, dy, stride=1, padding=1, transposed=False)
    if not ours:
        return runs
    for name in ("numpy", "numba"):
        b = tu.get_backend(name)
        runs[name] = (
            lambda b=b: b.conv2d(x, weight, geometry),
            lambda b=b: (b.conv2d_grads(dy, x, weight, geometry), b.bias_grad(dy)),
        )
    runs[GEMMS_ALONE] = im2col_gemms(rng, n, c, o, h, w)
    return runs


def im2col_gemms(rng, n, c, o, h, w):
    """The GEMMs of an im2col conv alone, on ready columns: numpy's float32 matmul on the
    layer's own shapes, a ceiling for any design that computes the conv through them.
    Forward (O, 9C) @ (9C, N*H*W); backward (9C, O) @ (O, N*H*W) and (O, N*H*W) @ (N*H*W, 9C)."""
    pixels = n * h * w
    columns = rng.standard_normal((9 * c, pixels), dtype=np.float32)
    weight = rng.standard_normal((o, 9 * c), dtype=np.float32)
    dy = rng.standard_normal((o, pixels), dtype=np.float32)
    return (lambda: weight @ columns, lambda: (weight.T @ dy, dy @ columns.T))


def upconv_runs(torch, ours, rng, n, c, o, h, w):
    """The same for a 2x2 stride-2 transposed conv with bias."""
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    weight = rng.standard_normal((c, o, 2, 2), dtype=np.float32) * 0.1
    dy = rng.standard_normal((n, o, 2 * h, 2 * w), dtype=np.float32)
    geometry = ConvGeometry((2, 2), (0, 0, 0, 0))
    runs = {}
    if torch:
        runs["torch"] = torch_conv(torch, x, weight, dy, stride=2, padding=0, transposed=True)
    for name in ("numpy", "numba") if ours else ():
        b = tu.get_backend(name)
        runs[name] = (
            lambda b=b: b.conv2d_grad_input(x, weight, geometry, (2 * h, 2 * w)),
            lambda b=b: b.conv_transpose2d_grads(dy, x, weight, geometry),
        )
    return runs


def torch_conv(torch, x, weight, dy, stride, padding, transposed):
    """Forward and backward (input, weight and bias gradients) of PyTorch's own kernels."""
    tx, tw, tdy = (torch.from_numpy(a) for a in (x, weight, dy))
    out_channels = weight.shape[1] if transposed else weight.shape[0]
    bias = torch.zeros(out_channels)
    forward_fn = torch.nn.functional.conv_transpose2d if transposed else torch.nn.functional.conv2d

    def forward():
        with torch.no_grad():
            return forward_fn(tx, tw, bias, stride=stride, padding=padding)

    def backward():
        return torch.ops.aten.convolution_backward(
            tdy, tx, tw, [out_channels], [stride] * 2, [padding] * 2, [1, 1], transposed,
            [0, 0], 1, [True, True, True])

    return forward, backward


def pool_runs(torch, ours, rng, n, c, h, w):
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    dy = rng.standard_normal((n, c, h // 2, w // 2), dtype=np.float32)
    geometry = PoolGeometry((2, 2), (2, 2))
    runs = {}
    for name in ("numpy", "numba") if ours else ():
        b = tu.get_backend(name)
        _, argmax = b.max_pool2d(x, geometry)
        runs[name] = (lambda b=b: b.max_pool2d(x, geometry),
                      lambda b=b, a=argmax: b.max_pool2d_backward(dy, a, x.shape))
    if torch:
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        _, index = torch.nn.functional.max_pool2d(tx, 2, return_indices=True)
        runs["torch"] = (
            lambda: torch.nn.functional.max_pool2d(tx, 2, return_indices=True),
            lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                tdy, tx, [2, 2], [2, 2], [0, 0], [1, 1], False, index),
        )
    return runs


def relu_runs(torch, ours, rng, n, c, h, w):
    x = rng.standard_normal((n, c, h, w), dtype=np.float32)
    y = np.maximum(x, 0)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    runs = {}
    for name in ("numpy", "numba") if ours else ():
        b = tu.get_backend(name)
        runs[name] = (lambda b=b: b.relu(x), lambda b=b: b.relu_backward(dy, y))
    if torch:
        tx, ty, tdy = (torch.from_numpy(a) for a in (x, y, dy))
        runs["torch"] = (lambda: torch.relu(tx),
                         lambda: torch.ops.aten.threshold_backward(tdy, ty, 0))
    return runs


def case_specs():
    """(label, FLOPs a pass, fewest channels, build(torch, ours, rng)) of every case."""
    specs = [(f"conv 3x3, {label}", 2 * n * o * c * 9 * h * w, min(c, o),
              partial(conv3x3_runs, n=n, c=c, o=o, h=h, w=w))
             for label, n, c, o, h, w in CONV3]
    specs += [(f"convT 2x2/2, {label}", 2 * n * o * c * 4 * h * w, min(c, o),
               partial(upconv_runs, n=n, c=c, o=o, h=h, w=w))
              for label, n, c, o, h, w in UPCONV]
    for label, n, c, h, w in POOL:
        specs.append((f"max-pool 2x2, {label}", 0, c, partial(pool_runs, n=n, c=c, h=h, w=w)))
        specs.append((f"ReLU, {label}", 0, c, partial(relu_runs, n=n, c=c, h=h, w=w)))
    return specs


def built_cases(torch, ours, only):
    """(case number, label, FLOPs a pass, fewest channels, runs) of the cases whose label
    contains ``only``. Each case draws its data from its own generator, seeded with its
    number, so PyTorch's child process (peer_server) builds the same inputs, and only
    its own runs."""
    return [(number, label, flops, channels,
             build(torch, ours, np.random.default_rng(number)))
            for number, (label, flops, channels, build) in enumerate(case_specs())
            if only in label]


def peer_server(threads: int, only: str):
    """PyTorch's side, in its own process: requests "<case number> fwd" or "... bwd"."""
    torch = import_torch(threads)
    calls = {}
    for number, _, _, _, runs in built_cases(torch, False, only):
        calls[f"{number} fwd"], calls[f"{number} bwd"] = runs["torch"]
    serve_peer(calls, torch_label(torch, "in a process of its own"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--conv-algo", help="force this conv algorithm on the numba backend "
                        "wherever it can run (one of tinyunet.backends.numba.policy.ALGOS)")
    # Only the cases whose label contains this (a quick check; the tests use it).
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)
    parser.add_argument("--peer-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.peer_server:
        peer_server(args.threads, args.only)
        return
    # PyTorch runs in a child process: in this one it would share the GNU OpenMP runtime
    # of our kernels and its settings, or, imported first, leave them on numba's
    # workqueue pool (see tinyunet.kernels.cpu.runtime.start_thread_pool).
    threads = compute_threads()
    peer = None
    if not args.no_torch and importlib.util.find_spec("torch") is not None:
        peer = PeerProcess(["benchmarks.ops", "--peer-server", "--threads", str(threads),
                            "--only", args.only])
    try:
        with _forced_conv_algo(args.conv_algo):
            body = _measure(args, threads, peer)
    finally:
        if peer:
            peer.close()
    print(body)
    if not args.no_write:
        write_section("ops", body)
        print("wrote benchmarks/RESULTS.md (section 'ops')")


def _forced_conv_algo(algo):
    """The numba backend's override for ``--conv-algo`` (nothing without it)."""
    if not algo:
        return contextlib.nullcontext()
    from tinyunet.backends.numba import force_conv_algo

    return force_conv_algo(algo)


def _measure(args, threads, peer):
    """Time every case and return the RESULTS.md section."""
    first_peak = sgemm_gflops()
    print(f"sgemm 1024^3 in numpy: {first_peak:.1f} GFLOP/s; threads {threads}; "
          f"torch {peer.label if peer else 'not used'}")
    backends = ["numpy", "numba"] + (["torch"] if peer else [])
    measured = []
    for number, label, flops, channels, runs in built_cases(None, True, args.only):
        if peer:
            runs["torch"] = (peer.run(f"{number} fwd"), peer.run(f"{number} bwd"))
        for phase, index in (("fwd", 0), ("bwd", 1)):
            names = [name for name in [*backends, GEMMS_ALONE] if name in runs]
            times = interleaved({name: runs[name][index] for name in names}, args.repeats)
            seconds = {name: median(times[name]) for name in names}
            work = flops * (2 if phase == "bwd" else 1)
            measured.append((label, phase, work, channels, seconds))
            print(label, phase, " | ".join(f"{name} {t * 1e3:.2f} ms"
                                           for name, t in seconds.items()), flush=True)
    # The machine's speed drifts; of the sgemm figures before and after the layers, the
    # higher one is the peak, so the percentages err low rather than high.
    peak = max(first_peak, sgemm_gflops())
    rows, wide_conv_shares = [], []
    for label, phase, work, channels, seconds in measured:
        cells = [label, phase]
        for name in [*backends, GEMMS_ALONE]:
            if name not in seconds:
                cells.append("-")
                continue
            cell = f"{seconds[name] * 1e3:.2f} ms"
            if work:
                gflops = work / seconds[name] / 1e9
                cell += f" ({gflops:.0f} GF/s, {100 * gflops / peak:.0f}%)"
                if name == "numba" and channels >= 64:
                    wide_conv_shares.append((f"{label} {phase}", gflops / peak))
            cells.append(cell)
        if peer:
            cells.append(f"{seconds['torch'] / seconds['numba']:.2f}x")
        rows.append(cells)
    header = (["layer", "pass"] + backends + [GEMMS_ALONE]
              + (["numba speed-up vs torch"] if peer else []))
    body = "\n".join([
        "## Per-op benchmark (`python -m benchmarks.ops`)",
        "",
        *machine_lines(threads, peer and peer.label),
        *([f"- numba conv algorithm forced wherever it runs: `{args.conv_algo}`"]
          if args.conv_algo else []),
        f"- float32 sgemm 1024^3 in numpy, measured in this run before and after the layers: "
        f"{peak:.1f} GFLOP/s, the higher of the two (the % in the table is of this)",
        f"- Medians of {args.repeats} round-robin repeats, each turn a rest, one untimed call "
        "and the timed one. Conv backward = input, weight and "
        "bias gradients, as a training step asks for them (`conv2d_grads` and "
        "`bias_grad`; `conv_transpose2d_grads`); GFLOP/s count conv arithmetic only.",
        f"- {GEMMS_ALONE}: the 3x3 layer's im2col GEMMs on ready columns (forward one, "
        "backward two), numpy's float32 matmul on the layer's own shapes: what any conv "
        "built on these GEMMs would spend on arithmetic alone.",
        "",
        table(header, rows),
        "",
        f"Issue 4's bar: conv layers with 64 or more channels at {WIDE_CONV_TARGET:.0%} or "
        "more of the sgemm figure on the numba backend.",
        "",
        *[f"- {label}: {share:.0%}: {'met' if share >= WIDE_CONV_TARGET else 'NOT met'}"
          for label, share in wide_conv_shares],
    ])
    return body


if __name__ == "__main__":
    main()
