"""Training-step benchmark: tinyunet's U-Net against the same U-Net in PyTorch.

    python -m benchmarks.train_step [--configs A B C] [--runs 3] [--backend numba] [--no-write]

A training step is zero_grad + forward + loss + backward + optimizer step, on float32,
1 input channel, 1 class (sigmoid + soft Dice), SGD with momentum 0.9, a U-Net with
'same' padding, 2x2 transposed-conv up and no normalisation:

    config  depth  base channels  batch  input
    A       4      16             4      128x128
    B       4      32             2      256x256
    C       3      8              8      64x64

Steps of the two frameworks alternate (round-robin; each turn rests, runs one untimed
step and times the next, back to back as in a training loop),
and the medians, min/max and their ratio come from that one run. PyTorch runs in a
child process of its own, one step per request (``peer_process``), so that each
framework keeps its own OpenMP settings. Inference (forward
only, no graph) is timed the same way. Peak memory is measured in a fresh child
process per framework and config (see ``memory_probe``): the peak resident set
(VmHWM) of three training steps above what the process held before them, after a
warm-up on a tiny input, and what that warm-up (first use of the framework) added.
PyTorch is optional; without it only tinyunet's figures are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np

from .common import (
    PeerProcess,
    compute_threads,
    import_torch,
    interleaved,
    machine_lines,
    median,
    serve_peer,
    table,
    torch_label,
    write_section,
)
from .torch_unet import soft_dice_loss, torch_unet


@dataclass(frozen=True)
class Config:
    depth: int
    base: int
    batch: int
    size: int
    repeats: int  # timed steps per framework; fewer for the slow config B


CONFIGS = {
    "A": Config(depth=4, base=16, batch=4, size=128, repeats=15),
    "B": Config(depth=4, base=32, batch=2, size=256, repeats=7),
    "C": Config(depth=3, base=8, batch=8, size=64, repeats=30),
}
# The bars of issue 4: speed-up over PyTorch (its time / ours) that each config must reach.
TRAIN_TARGETS = {"A": 1.1, "B": 1.3, "C": 1.5}
INFERENCE_TARGETS = {"A": 1.1, "B": 1.3}
LEARNING_RATE, MOMENTUM = 0.01, 0.9


def make_batch(config: Config, seed: int = 0):
    """A float32 image batch (N, 1, H, W) and a binary mask batch of blobs, same shape."""
    rng = np.random.default_rng(seed)
    shape = (config.batch, 1, config.size, config.size)
    image = rng.standard_normal(shape, dtype=np.float32)
    yy, xx = np.mgrid[: config.size, : config.size] / config.size
    centres = rng.uniform(0.2, 0.8, size=(config.batch, 2))
    distance = ((yy[None] - centres[:, 0, None, None]) ** 2
                + (xx[None] - centres[:, 1, None, None]) ** 2)
    mask = (distance < 0.05).astype(np.float32)[:, None]
    return image + 2 * mask, mask


# ---- tinyunet ---------------------------------------------------------------------

def tinyunet_runs(config: Config, backend: str):
    """(train_step, inference) closures of tinyunet's U-Net on ``backend``."""
    import tinyunet as tu
    import tinyunet.functional as F
    from tinyunet import nn, optim

    tu.set_backend(backend)
    tu.manual_seed(0)
    model = nn.UNet(in_channels=1, num_classes=1, depth=config.depth,
                    base_channels=config.base, padding="same", up="transpose")
    optimizer = optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    image, mask = make_batch(config)
    x, target = tu.tensor(image), tu.tensor(mask)

    def train_step():
        optimizer.zero_grad()
        loss = F.dice_loss(model(x), target)
        loss.backward()
        optimizer.step()
        return loss.item()

    def inference():
        with tu.no_grad():
            return model(x).data

    return train_step, inference


# ---- PyTorch (the peer) -------------------------------------------------------------

def torch_runs(config: Config, torch, device: str = "cpu"):
    """The same U-Net, loss and optimizer in PyTorch, on ``device``."""
    torch.manual_seed(0)
    model = torch_unet(torch, config.depth, config.base).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    image, mask = (torch.from_numpy(a).to(device) for a in make_batch(config))

    def train_step():
        optimizer.zero_grad()
        loss = soft_dice_loss(torch, model(image), mask)
        loss.backward()
        optimizer.step()
        return loss.item()

    def inference():
        with torch.no_grad():
            return model(image)

    return train_step, inference


# ---- PyTorch in a process of its own ----------------------------------------------

def peer_process(config_name: str, threads: int) -> PeerProcess:
    """PyTorch's train step and inference of one config, in a child process: requests
    "train" and "infer"."""
    return PeerProcess(["benchmarks.train_step", "--peer-server", "--configs", config_name,
                        "--threads", str(threads)])


def peer_server(config_name: str, threads: int):
    """The child's side of peer_process."""
    torch = import_torch(threads)
    train, infer = torch_runs(CONFIGS[config_name], torch)
    serve_peer({"train": train, "infer": infer}, torch_label(torch, "in a process of its own"))


# ---- peak memory, in a fresh process ------------------------------------------------

def _rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc/self/status.

    Not ru_maxrss: Linux carries that across exec, so a child started by a big parent
    would report the parent's peak.
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(framework: str, config_name: str, backend: str, threads: int):
    """Run in a child process; print peak RSS figures (MiB) as JSON.

    First a warm-up: two steps of the same U-Net on one 16x16 image, which loads what
    each framework loads on first use (numba's compiled kernels and thread pool,
    oneDNN's JIT kernels); ``warmup_mib`` is the resident set that adds. Then the
    config's model and data are built, the peak is reset where Linux allows it, and
    three steps run: ``step_mib`` is their peak above the resident set just before
    them, what a training step itself holds; ``total_mib`` = warmup_mib + step_mib.
    """
    config = CONFIGS[config_name]
    tiny = Config(depth=config.depth, base=config.base, batch=1, size=16, repeats=1)
    if framework == "torch":
        runs = partial(torch_runs, torch=import_torch(threads))
    else:
        runs = partial(tinyunet_runs, backend=backend)
    before_warmup = _rss_kib("VmRSS")
    warm_step, _ = runs(tiny)
    warm_step()
    warm_step()
    del warm_step
    warmup = _rss_kib("VmRSS") - before_warmup
    step, _ = runs(config)
    before = _rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
    except OSError:
        pass  # then the peak may still be the warm-up's, which is smaller
    for _ in range(3):
        step()
    step_mib = (_rss_kib("VmHWM") - before) / 1024
    print(json.dumps({"warmup_mib": warmup / 1024, "step_mib": step_mib,
                      "total_mib": warmup / 1024 + step_mib}))


def measure_memory(framework, config_name, backend, threads):
    command = [sys.executable, "-m", "benchmarks.train_step", "--memory-probe", framework,
               "--configs", config_name, "--backend", backend]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- the benchmark --------------------------------------------------------------------

def _fmt(seconds_list):
    """'median ms (min-max)' of a sorted list of seconds."""
    return (f"{median(seconds_list) * 1e3:.1f} ms "
            f"({seconds_list[0] * 1e3:.1f}-{seconds_list[-1] * 1e3:.1f})")


def _time_all(args, threads, torch, peers):
    """Time every config's training step and inference, ``args.runs`` times, against
    PyTorch in child processes (appended to ``peers``, for the caller to close).
    Returns (pooled seconds, each run's speed-ups, PyTorch's label or None)."""
    competitors = {}
    for name in args.configs:
        ours_step, ours_infer = tinyunet_runs(CONFIGS[name], args.backend)
        runs_train, runs_infer = {"tinyunet": ours_step}, {"tinyunet": ours_infer}
        if torch:
            peer = peer_process(name, threads)
            peers.append(peer)
            runs_train["torch"], runs_infer["torch"] = peer.run("train"), peer.run("infer")
        competitors[name] = runs_train, runs_infer
    torch_version = peers[0].label if peers else None
    print(f"threads {threads}; tinyunet backend {args.backend}; "
          f"torch {torch_version or 'not used'}", flush=True)
    # Every run times every config, so the runs sample the machine at different times;
    # the tables pool their steps, the speed-ups list each run's too.
    pooled = {(name, kind): {} for name in args.configs for kind in ("train", "infer")}
    run_ratios = {key: [] for key in pooled}
    for run in range(args.runs):
        for name in args.configs:
            repeats = args.repeats or CONFIGS[name].repeats
            for kind, runs, warmup in zip(("train", "infer"), competitors[name], (2, 1),
                                          strict=True):
                times = interleaved(runs, repeats, warmup=warmup)
                for framework, seconds in times.items():
                    pooled[name, kind].setdefault(framework, []).extend(seconds)
                if torch:
                    ratio = median(times["torch"]) / median(times["tinyunet"])
                    run_ratios[name, kind].append(ratio)
                print(f"run {run + 1} {kind} {name}: "
                      + ", ".join(f"{fw} {median(t) * 1e3:.1f} ms" for fw, t in times.items()),
                      flush=True)
    return pooled, run_ratios, torch_version


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--backend", default="numba", help="tinyunet backend (default numba)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per framework (default: 15 for A, 7 for B, 30 for C)")
    parser.add_argument("--runs", type=int, default=1,
                        help="times to repeat the whole timing, configs in turn (default 1)")
    parser.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--memory-probe", choices=["tinyunet", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--peer-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.peer_server:
        peer_server(args.configs[0], args.threads)
        return
    threads = compute_threads()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.configs[0], args.backend, threads)
        return
    # PyTorch is imported only in its own processes (peer_process, the memory probes).
    torch = not args.no_torch and importlib.util.find_spec("torch") is not None
    peers = []
    try:
        pooled, run_ratios, torch_version = _time_all(args, threads, torch, peers)
    finally:
        for peer in peers:
            peer.close()

    def speed_up(name, kind):
        times = pooled[name, kind]
        ratio = median(times["torch"]) / median(times["tinyunet"])
        each = run_ratios[name, kind]
        runs = f" (runs: {', '.join(f'{r:.2f}' for r in each)})" if len(each) > 1 else ""
        return ratio, f"**{ratio:.2f}x**{runs}"

    train_rows, infer_rows, memory_rows, verdicts = [], [], [], []
    for name in args.configs:
        train = {fw: sorted(t) for fw, t in pooled[name, "train"].items()}
        infer = {fw: sorted(t) for fw, t in pooled[name, "infer"].items()}
        images = CONFIGS[name].batch
        row = [name, _fmt(train["tinyunet"]),
               f"{images / median(train['tinyunet']):.1f}"]
        infer_row = [name, _fmt(infer["tinyunet"])]
        if torch:
            train_ratio, train_cell = speed_up(name, "train")
            row += [_fmt(train["torch"]), f"{images / median(train['torch']):.1f}",
                    train_cell, f"{TRAIN_TARGETS[name]}x"]
            verdicts.append((f"training {name}", train_ratio, TRAIN_TARGETS[name]))
            infer_ratio, infer_cell = speed_up(name, "infer")
            infer_row += [_fmt(infer["torch"]), infer_cell,
                          f"{INFERENCE_TARGETS[name]}x" if name in INFERENCE_TARGETS else "-"]
            if name in INFERENCE_TARGETS:
                verdicts.append((f"inference {name}", infer_ratio, INFERENCE_TARGETS[name]))
        train_rows.append(row)
        infer_rows.append(infer_row)
        if not args.no_memory:
            ours = measure_memory("tinyunet", name, args.backend, threads)
            mem_row = [name, f"{ours['step_mib']:.0f} MiB", f"{ours['warmup_mib']:.0f} MiB"]
            if torch:
                peer = measure_memory("torch", name, args.backend, threads)
                mem_row += [f"{peer['step_mib']:.0f} MiB", f"{peer['warmup_mib']:.0f} MiB",
                            "yes" if ours["step_mib"] <= peer["step_mib"] else "no",
                            "yes" if ours["total_mib"] <= peer["total_mib"] else "no"]
            memory_rows.append(mem_row)
            print("memory", " | ".join(mem_row), flush=True)

    peer_cols = ["PyTorch step", "PyTorch img/s", "speed-up", "target"] if torch else []
    lines = [
        "## Training step (`python -m benchmarks.train_step`)",
        "",
        *machine_lines(threads, torch_version),
        f"- tinyunet backend: `{args.backend}`. Medians over round-robin repeats, each turn "
        "a rest, one untimed step and the timed one (15 timed steps for "
        f"A, 7 for B, 30 for C unless --repeats, per run; {args.runs} run(s), each timing "
        "every config in turn, steps pooled), min-max in brackets; speed-up = PyTorch "
        "time / tinyunet time, with each run's own in brackets when there are several. "
        "PyTorch runs in a child process of its own, driven step by step in turn with "
        "tinyunet's and timing itself: in this process it would share the GNU OpenMP "
        "runtime that tinyunet's kernels run on, told to wait passively, which slowed "
        "its steps 15-50% (measured).",
        "",
        "### Training step (zero_grad + forward + loss + backward + SGD step)",
        "",
        table(["config", "tinyunet step", "tinyunet img/s", *peer_cols], train_rows),
        "",
        "### Inference (forward only, batch as above)",
        "",
        table(["config", "tinyunet", *(["PyTorch", "speed-up", "target"] if torch else [])],
              infer_rows),
    ]
    if memory_rows:
        lines += [
            "",
            "### Peak memory of training (fresh process per framework and config)",
            "",
            "Step = the peak resident set (VmHWM) over 3 training steps minus the resident "
            "set just before them: what a step holds (activations, gradients, scratch). "
            "Warm-up = the resident set added by first use, measured on two steps of the "
            "same U-Net on one 16x16 image (numba's compiled kernels and threads; "
            "oneDNN's JIT kernels). The last column compares warm-up + step.",
            "",
            table(["config", "tinyunet step", "tinyunet warm-up",
                   *(["PyTorch step", "PyTorch warm-up", "step <= PyTorch's",
                      "warm-up + step <= PyTorch's"] if torch else [])], memory_rows),
        ]
    if verdicts:
        lines += ["", "### Targets of issue 4", ""]
        lines += [f"- {label}: {ratio:.2f}x vs target {target}x: "
                  f"{'met' if ratio >= target else 'NOT met'}"
                  for label, ratio, target in verdicts]
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        write_section("train_step", body)
        print("wrote benchmarks/RESULTS.md (section 'train_step')")


if __name__ == "__main__":
    main()
