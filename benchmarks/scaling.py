"""Data-parallel scaling: training steps of configs A and B on 1 and 2 MPI ranks.

    python -m benchmarks.scaling [--configs A B] [--steps 12] [--no-write]

Each rank runs one thread (NUMBA_NUM_THREADS=1, OMP and OpenBLAS too) and the U-Net,
loss and optimizer of benchmarks/train_step.py, with that config's batch per rank, so
2 ranks train a global batch twice as large (weak scaling). One rank is a plain
process without MPI, as a user without mpiexec runs it; two ranks are
``mpiexec -n 2`` and sum their gradients with ``Communicator.reduce_gradients`` (one
allreduce of the flat float32 gradient buffer per step).

Reported: the median step (zero_grad, forward, loss, backward, reduction, optimizer
step), images per second (global batch / step), the speed-up of 2 ranks over 1 in
images per second, the share of a step spent in ``reduce_gradients`` (packing, the
allreduce, and any wait for the slower rank), the allreduce alone (the same buffer,
right after a barrier, so without waiting) and the bytes reduced per step. Then, on
paper, the efficiency to expect on N nodes: a ring allreduce sends and receives
2(N-1)/N of the buffer per rank, over a stated bandwidth, after the measured
one-rank step (the reduction is not overlapped with the backward pass).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from .common import machine_lines, median, table, write_section
from .train_step import CONFIGS, LEARNING_RATE, MOMENTUM, make_batch

ONE_THREAD = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
RESULT = "scaling-result "  # marks the worker's answer among anything it prints
WARMUP = 2
# Interconnects of the projection (Gb/s) and a per-message latency for each of the
# 2(N-1) messages of a ring allreduce.
BANDWIDTHS_GBIT = (10, 100)
LATENCY_S = 5e-6
NODES = (2, 4, 8, 16, 64)


def worker(config_name: str, steps: int):
    """One rank's timings; rank 0 prints them as one JSON line."""
    import tinyunet as tu
    import tinyunet.functional as F
    from tinyunet import nn, optim
    from tinyunet.distributed import from_launcher

    comm = from_launcher()
    rank = 0 if comm is None else comm.rank
    config = CONFIGS[config_name]
    tu.set_backend("numba")
    tu.manual_seed(0)
    model = nn.UNet(in_channels=1, num_classes=1, depth=config.depth,
                    base_channels=config.base, padding="same", up="transpose")
    optimizer = optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    image, mask = make_batch(config, seed=rank)  # each rank its own shard
    x, target = tu.tensor(image), tu.tensor(mask)
    step_times, reduce_times = [], []
    for step in range(WARMUP + steps):
        started = time.perf_counter()
        optimizer.zero_grad()
        loss = F.dice_loss(model(x), target)
        loss.backward()
        reduced = time.perf_counter()
        if comm is not None:
            comm.reduce_gradients(optimizer.params, loss, 1 / comm.size)
        reduced = time.perf_counter() - reduced
        optimizer.step()
        if step >= WARMUP:
            step_times.append(time.perf_counter() - started)
            reduce_times.append(reduced)
    result = {"steps": step_times, "reduce": reduce_times, "bytes": 0, "alone": []}
    if comm is not None:
        result["bytes"] = comm.reduced_bytes
        buffer = np.zeros(comm.reduced_bytes // 4, np.float32)
        for _ in range(10):
            comm.comm.Barrier()
            started = time.perf_counter()
            comm.comm.Allreduce(comm.MPI.IN_PLACE, buffer, op=comm.MPI.SUM)
            result["alone"].append(time.perf_counter() - started)
    if rank == 0:
        print(RESULT + json.dumps(result), flush=True)


def launch(config_name: str, ranks: int, steps: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.scaling", "--worker", config_name,
               "--steps", str(steps)]
    if ranks > 1:
        mpiexec = shutil.which("mpiexec", path=os.pathsep.join(
            [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        if mpiexec is None:
            raise SystemExit("benchmarks.scaling: mpiexec not found; pip install -e '.[mpi]'")
        command = [mpiexec, "-n", str(ranks), *command]
    done = subprocess.run(command, env={**os.environ, **ONE_THREAD}, capture_output=True,
                          text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise SystemExit(f"benchmarks.scaling: {config_name} on {ranks} rank(s) failed:\n"
                     f"{done.stdout}{done.stderr}")


def ring_allreduce_seconds(nbytes: int, nodes: int, gbit: float) -> float:
    """A ring allreduce of ``nbytes`` on ``nodes``: 2(N-1)/N of the bytes over the link,
    and 2(N-1) messages of LATENCY_S each."""
    moved = 2 * (nodes - 1) / nodes * nbytes
    return moved * 8 / (gbit * 1e9) + 2 * (nodes - 1) * LATENCY_S


def projection(compute_s: float, nbytes: int) -> list[list[str]]:
    """Rows of the expected efficiency on N nodes of one rank each (no overlap), and the
    shortest step that keeps 90% on the most nodes (a node that computes faster, with
    all its cores or a GPU, has less time to hide the same bytes)."""
    rows = []
    for gbit in BANDWIDTHS_GBIT:
        row = [f"{gbit} Gb/s"]
        for n in NODES:
            seconds = ring_allreduce_seconds(nbytes, n, gbit)
            row.append(f"{compute_s / (compute_s + seconds):.0%} ({seconds * 1e3:.0f} ms)")
        row.append(f"{9 * ring_allreduce_seconds(nbytes, NODES[-1], gbit) * 1e3:.0f} ms")
        rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["A", "B"], choices=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.update(ONE_THREAD)  # for the workers, and so that machine_lines says so
    if args.worker:
        worker(args.worker, args.steps)
        return

    load_before = os.getloadavg()[0]
    rows, projections = [], []
    for name in args.configs:
        config = CONFIGS[name]
        one = launch(name, 1, args.steps)
        two = launch(name, 2, args.steps)
        rate = {}
        for ranks, result in ((1, one), (2, two)):
            step = median(result["steps"])
            rate[ranks] = ranks * config.batch / step
            share = (f"{median(result['reduce']) / step:.1%}" if ranks > 1 else "-")
            alone = (f"{median(result['alone']) * 1e3:.1f} ms" if ranks > 1 else "-")
            rows.append([
                name, str(ranks), str(ranks * config.batch),
                f"{step * 1e3:.0f} ({min(result['steps']) * 1e3:.0f}-"
                f"{max(result['steps']) * 1e3:.0f})",
                f"{rate[ranks]:.2f}", f"{rate[ranks] / rate[1]:.2f}x" if ranks > 1 else "-",
                share, alone,
                f"{result['bytes'] / 2**20:.2f} MiB" if ranks > 1 else "-"])
        projections.append((name, median(one["steps"]), two["bytes"]))
        print("\n".join(" | ".join(row) for row in rows[-2:]), flush=True)

    body = [
        "## Data-parallel scaling (`python -m benchmarks.scaling`)",
        "",
        *machine_lines(1, None),
        f"- {args.steps} timed steps per run after {WARMUP} untimed; numba backend; one "
        "thread per rank; 1 rank = a plain process, 2 ranks = `mpiexec -n 2` (MPICH, "
        "shared memory on one machine)",
        f"- Load average (1 min) {load_before:.1f} before the runs and "
        f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores: above 1 per core, "
        "other work shared the cores, and 2 ranks lose more to it than 1",
        "",
        table(["config", "ranks", "global batch", "step ms (min-max)", "images/s",
               "speed-up", "share in reduction", "allreduce alone", "bytes per step"],
              rows),
        "",
        "\"share in reduction\" is the part of a step in `reduce_gradients`: packing, the "
        "allreduce and the wait for the slower rank; \"allreduce alone\" is the same "
        "buffer reduced right after a barrier.",
        "",
        f"Projection on paper, N nodes of one rank each: a ring allreduce sends and "
        f"receives 2(N-1)/N of the bytes per rank, plus {LATENCY_S * 1e6:g} us for each of "
        "its 2(N-1) messages; efficiency = one-rank step / (one-rank step + allreduce), "
        "with no overlap of the reduction and the backward pass (allreduce time in "
        "brackets).",
        "",
    ]
    for name, compute_s, nbytes in projections:
        body += [f"Config {name}: one-rank step {compute_s * 1e3:.0f} ms, "
                 f"{nbytes / 2**20:.2f} MiB per step", "",
                 table(["link", *(f"N = {n}" for n in NODES),
                        f"step for 90% at N = {NODES[-1]}"], projection(compute_s, nbytes)),
                 ""]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("scaling", text)


if __name__ == "__main__":
    main()
