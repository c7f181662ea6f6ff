"""CPU inference: tinyunet's own engine against ONNX Runtime on the same exported U-Net.

    python -m benchmarks.inference_onnx [--configs A B C] [--repeats N] [--threads 2]
                                        [--note TEXT] [--no-write]

For each config of ``benchmarks.train_step`` (A, B, C: 'same' U-Nets, 1 channel in,
1 class out, 2x2 transposed-conv up; the batch and image size of the config) the same
seeded weights are written twice, as safetensors (read back by tinyunet) and as ONNX.
Two child processes then serve one forward pass each per request: tinyunet's (numba
backend, no graph) and ONNX Runtime's (CPU provider), each on ``--threads`` threads
(NUMBA_NUM_THREADS for ours, intra_op_num_threads for ONNX Runtime). The parent drives
them round-robin as ``benchmarks.common.interleaved`` does and reports medians, min-max
and the ratio (ONNX Runtime's time / tinyunet's: above 1, tinyunet is faster). After
the timing both children save their logits, and the table shows how far apart they are.

The whole comparison runs twice: with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE as this
process has them, and with both removed from the children's environment, since
OpenBLAS picks its kernels and blocking from them (tinyunet's GEMMs call OpenBLAS
through numpy; ONNX Runtime uses its own GEMMs).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import PeerProcess, cpu_name, interleaved, median, serve_peer, table, write_section
from .train_step import CONFIGS, make_batch

OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
REPEATS = {"A": 10, "B": 5, "C": 20}
FRAMEWORKS = ("tinyunet", "onnxruntime")


def write_models(config_name: str, folder: Path) -> tuple[Path, Path]:
    """The config's seeded U-Net as (safetensors, ONNX) files in ``folder``."""
    import tinyunet as tu
    from tinyunet.export import to_onnx, to_safetensors
    from tinyunet.nn import UNet

    config = CONFIGS[config_name]
    tu.manual_seed(0)
    model = UNet(in_channels=1, num_classes=1, depth=config.depth, base_channels=config.base,
                 padding="same", up="transpose").to("numpy")
    weights = to_safetensors(model, folder / f"{config_name}.safetensors", overwrite=True)
    graph = to_onnx(model, folder / f"{config_name}.onnx", overwrite=True)
    return weights, graph


# ---- the children ----------------------------------------------------------------------

def serve(framework: str, config_name: str, model_path: str, threads: int, save_to: str):
    """A child's side: answer "label", "infer" (one timed forward) and "save" (the logits
    to ``save_to``)."""
    batch = make_batch(CONFIGS[config_name])[0]
    if framework == "tinyunet":
        import numba

        import tinyunet as tu
        from tinyunet.export import from_safetensors

        tu.set_backend("numba")
        model = from_safetensors(model_path, backend="numba")
        x = tu.tensor(batch)

        def infer():
            with tu.no_grad():
                return model(x).numpy()

        label = (f"tinyunet {tu.__version__}, numba {numba.__version__} backend, "
                 f"{numba.get_num_threads()} threads")
    else:
        import onnxruntime

        from tinyunet.onnx_runtime import OnnxModel

        model = OnnxModel(model_path, threads=threads)

        def infer():
            return model.predict_batch(batch)

        label = (f"onnxruntime {onnxruntime.__version__}, CPU provider, {threads} intra-op "
                 "threads")
    serve_peer({"infer": infer, "save": lambda: np.save(save_to, infer())}, label)


def child_environment(threads: int, keep_openblas: bool) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    if not keep_openblas:
        for name in OPENBLAS_VARIABLES:
            env.pop(name, None)
    return env


# ---- the parent ------------------------------------------------------------------------

def _fmt(seconds):
    return f"{median(seconds) * 1e3:.1f} ms ({seconds[0] * 1e3:.1f}-{seconds[-1] * 1e3:.1f})"


def compare(config_name: str, files: tuple[Path, Path], folder: Path, threads: int,
            env: dict, repeats: int) -> tuple[list[str], dict]:
    """One table row for one config in one environment, and the children's labels."""
    peers = {}
    try:
        for framework, path in zip(FRAMEWORKS, files, strict=True):
            save_to = folder / f"{config_name}-{framework}.npy"
            peers[framework] = PeerProcess(
                ["benchmarks.inference_onnx", "--serve", framework, "--configs", config_name,
                 "--model-file", str(path), "--threads", str(threads),
                 "--save-to", str(save_to)], env=env)
        times = interleaved({name: peer.run("infer") for name, peer in peers.items()},
                            repeats, warmup=2)
        for peer in peers.values():
            peer.run("save")()
        labels = {name: peer.label for name, peer in peers.items()}
    finally:
        for peer in peers.values():
            peer.close()
    ours, theirs = (np.load(folder / f"{config_name}-{name}.npy") for name in FRAMEWORKS)
    difference = float(np.abs(ours - theirs).max() / np.abs(ours).max())
    config = CONFIGS[config_name]
    ratio = median(times["onnxruntime"]) / median(times["tinyunet"])
    row = [config_name, f"{config.batch}x1x{config.size}x{config.size}, depth {config.depth}, "
           f"{config.base} base channels", _fmt(times["tinyunet"]), _fmt(times["onnxruntime"]),
           f"**{ratio:.2f}x**", f"{difference:.1e}"]
    print(" | ".join(row), flush=True)
    return row, labels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per framework (default: A 10, B 5, C 20)")
    parser.add_argument("--threads", type=int, default=2, help="threads per framework")
    parser.add_argument("--note", default="", help="a line for RESULTS.md (e.g. the load)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--serve", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--model-file", help=argparse.SUPPRESS)
    parser.add_argument("--save-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.configs[0], args.model_file, args.threads, args.save_to)
        return

    as_set = ", ".join(f"{name}={os.environ[name]}" for name in OPENBLAS_VARIABLES
                       if name in os.environ) or "neither set"
    environments = {f"OpenBLAS variables as set here ({as_set})": True,
                    f"`env -u {' -u '.join(OPENBLAS_VARIABLES)}`": False}
    load_before = os.getloadavg()
    sections, labels = [], {}
    with tempfile.TemporaryDirectory(prefix="tinyunet-onnx-bench-") as temporary:
        folder = Path(temporary)
        files = {name: write_models(name, folder) for name in args.configs}
        for title, keep in environments.items():
            print(f"children's environment: {title}", flush=True)
            env = child_environment(args.threads, keep)
            rows = []
            for name in args.configs:
                row, labels = compare(name, files[name], folder, args.threads, env,
                                      args.repeats or REPEATS[name])
                rows.append(row)
            sections += ["", f"### Children's environment: {title}", "",
                         table(["config", "input, U-Net", "tinyunet", "ONNX Runtime",
                                "speed-up (ORT time / ours)", "max abs difference / max abs logit"],
                               rows)]
    load_after = os.getloadavg()
    shown = [a for i, a in enumerate(sys.argv[1:], 1)
             if a != "--note" and sys.argv[i - 1] != "--note" and not a.startswith("--note=")]
    import numba

    lines = [
        "## CPU inference: tinyunet against ONNX Runtime (`python -m benchmarks.inference_onnx`)",
        "",
        f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; {platform.system()} "
        f"{platform.release()}",
        f"- Python {platform.python_version()}, numpy {np.__version__}, numba "
        f"{numba.__version__}; {labels.get('tinyunet')}; {labels.get('onnxruntime')}",
        f"- Each framework in a child process of its own, {args.threads} threads each; the "
        "same seeded weights (exported to safetensors for tinyunet, to ONNX for ONNX "
        "Runtime). Forward only, float32, the batch of benchmarks.train_step's config. "
        "Medians over round-robin turns (each a short rest, an untimed call and the timed "
        f"one; {'A 10, B 5, C 20' if args.repeats is None else args.repeats} timed calls "
        "per framework), min-max in brackets.",
        f"- Load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in load_before)} before, "
        f"{', '.join(f'{v:.1f}' for v in load_after)} after.",
        f"- Command: `{shlex.join(['python', '-m', 'benchmarks.inference_onnx', *shown])}`"
        + (" (and `--note`, below)" if args.note else ""),
        f"- Date: {time.strftime('%Y-%m-%d %H:%M')}",
    ]
    if not any(name in os.environ for name in OPENBLAS_VARIABLES):
        lines.append("- Neither OpenBLAS variable is set here, so the two tables ran in the "
                     "same environment and differ only by when they ran.")
    if args.note:
        lines.append(f"- Note: {args.note}")
    body = "\n".join(lines + sections)
    print(body)
    if not args.no_write:
        write_section("inference_onnx", body)
        print("wrote benchmarks/RESULTS.md (section 'inference_onnx')")


if __name__ == "__main__":
    main()
