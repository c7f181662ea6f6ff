"""Real microscopy: tinyunet's defaults against a PyTorch U-Net recipe and a global Otsu
threshold, scored alike on held-out test images.

    python -m benchmarks.real_data_sets --out /work/data     # the three real sets
    python -m benchmarks.real_data --data /work/data/SET [--data DIR2 ...] [--set NAME ...]
        [--methods tinyunet,torch,otsu] [--torch-python PATH] [--timeout S]
    python -m benchmarks.real_data --synthetic 20x1100 [...]

Each data folder holds ``train/`` and ``test/``, each with ``images/`` and ``masks/`` whose
files share stems (TIFF, PNG or NPY; grey, or channels last and averaged to grey). Every
method runs in a process of its own:

- ``tinyunet``: ``tinyunet train --data SET/train --out RUN`` with the defaults (its wall
  clock is the train time), then ``tinyunet evaluate --checkpoint RUN --data
  SET/test --csv`` (the mean Dice of its CSV) and ``tinyunet predict`` on the test images,
  whose masks are scored with the shared Dice below.
- ``torch``: the recipe of issue 18, written here: a U-Net of depth 4 with 16 base
  channels and 'same' padding, Adam 1e-3, BCE + soft Dice, 600 steps of batches of 4
  random 128x128 crops with random flips and 90-degree rotations; images normalised per
  image by the percentiles 1 and 99.8 (as tinyunet's ``normalize_percentile``); whole-image
  inference (padded to a multiple of 16), foreground where the logit is above 0. It runs
  under ``--torch-python`` (default: this interpreter) with 2 threads whose OpenMP waits
  passively (``OMP_WAIT_POLICY=PASSIVE`` unless set), and is skipped with a line saying
  so when that interpreter has no PyTorch.
- ``otsu``: a global Otsu threshold per test image (a 1024-bin histogram of the raw
  pixels); foreground is the brighter side, as for fluorescence (on transmitted-light
  images that choice is often wrong, and the score shows it).

``--synthetic COUNTxSIZE`` writes a set of synthetic 16-bit nuclei
(``tinyunet.data.make_nuclei``): COUNT training and max(2, COUNT // 10) test images of
SIZE x SIZE pixels with instance-id masks, drawn from fixed seeds, into the work folder,
and runs it like the others under the name ``synthetic-COUNTxSIZE``. It times the
defaults on the largest folders they are meant for (20 images of 1100 px) anywhere.

Scoring is the same for all: foreground is ``mask > 0`` (instance ids and class labels
alike) and, for predictions, any label above 0; Dice = 2|P & T| / (|P| + |T|) per test
image (1 when both are empty), averaged over the test images.

Results accumulate in benchmarks/real_data.json (one entry per set and method, the latest
run kept), from which the ``real_data`` section of benchmarks/RESULTS.md is rewritten.
This file imports only the standard library and numpy at the top, so that the PyTorch
child can run it by path under another interpreter.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.torch_unet import soft_dice_loss, torch_unet

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
JSON_RESULTS = HERE / "real_data.json"
METHODS = ("tinyunet", "torch", "otsu")
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".npy")

# The PyTorch recipe of issue 18.
DEPTH, BASE_CHANNELS = 4, 16
STEPS, BATCH, CROP = 600, 4, 128
LEARNING_RATE = 1e-3
TORCH_THREADS = 2
OTSU_BINS = 1024


# ---- files --------------------------------------------------------------------------------

def read_pixels(path: Path) -> np.ndarray:
    """The pixels of an image file as stored: TIFF through tifffile (which keeps every
    dtype), PNG through Pillow, NPY through numpy."""
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError as error:
            raise SystemExit(f"{path}: reading TIFF needs tifffile ({sys.executable} -m pip "
                             "install tifffile)") from error
        return tifffile.imread(path)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def read_grey(path: Path) -> np.ndarray:
    """An (H, W) float32 image; channels last (H, W, C <= 4) are averaged."""
    pixels = read_pixels(path)
    if pixels.ndim == 3 and pixels.shape[2] <= 4:
        pixels = pixels.mean(axis=2)
    if pixels.ndim != 2:
        raise SystemExit(f"{path}: Expect: a 2-D image or channels last (H, W, C <= 4). "
                         f"Actual: shape {pixels.shape}.")
    return pixels.astype(np.float32)


def read_foreground(path: Path) -> np.ndarray:
    """The (H, W) bool foreground of a mask: any label above 0."""
    pixels = read_pixels(path)
    if pixels.ndim == 3:
        return (pixels > 0).any(axis=2)
    return pixels > 0


def pairs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image of ``folder/images`` and its mask."""
    def index(sub):
        if not (folder / sub).is_dir():
            raise SystemExit(f"{folder / sub}: not a folder. Expect: {folder} with images/ "
                             "and masks/.")
        files = sorted(p for p in (folder / sub).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return {p.stem: p for p in files}

    images, masks = index("images"), index("masks")
    missing = sorted(set(images) ^ set(masks))
    if missing:
        raise SystemExit(f"{folder}: Expect: images/ and masks/ with the same stems. "
                         f"Actual: unmatched {missing}.")
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


# ---- scoring and the Otsu baseline ---------------------------------------------------------

def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Binary foreground Dice of two (H, W) bool maps; 1 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((prediction & truth).sum()) / total


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """(x - p_low) / (p_high - p_low) of an (H, W) image, unclipped, as tinyunet does."""
    lo, hi = np.percentile(image, [low, high])
    span = hi - lo if hi - lo > 1e-12 else 1.0
    return ((image - lo) / span).astype(np.float32)


def otsu_threshold(image: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of ``image``: the histogram cut (at a bin edge) that maximises the
    between-class variance w0 w1 (mu0 - mu1)^2. Pixels above it are the bright class."""
    counts, edges = np.histogram(image, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(counts)[:-1].astype(np.float64)  # class 0: bins 0..k
    weight_high = counts.sum() - weight_low
    mass_low = np.cumsum(counts * centres)[:-1]
    mass_high = (counts * centres).sum() - mass_low
    valid = (weight_low > 0) & (weight_high > 0)
    if not valid.any():  # a flat image: nothing to separate
        return float(edges[-1])
    between = np.zeros_like(weight_low)
    between[valid] = (weight_low[valid] * weight_high[valid]
                      * (mass_low[valid] / weight_low[valid]
                         - mass_high[valid] / weight_high[valid]) ** 2)
    return float(edges[1 + int(np.argmax(between))])


def run_otsu(set_dir: Path) -> dict:
    """Dice of a global Otsu threshold (bright = foreground) on each test image."""
    scores = {}
    for stem, image_path, mask_path in pairs(set_dir / "test"):
        image = read_grey(image_path)
        scores[stem] = dice(image > otsu_threshold(image), read_foreground(mask_path))
    return {"status": "ok", "dice": float(np.mean(list(scores.values()))),
            "per_image": scores, "train_seconds": 0.0}


# ---- the PyTorch recipe ----------------------------------------------------------------------

def random_crop(image: np.ndarray, truth: np.ndarray, rng: np.random.Generator):
    """A CROP x CROP crop of an (H, W) pair at a uniform position (reflect-padded first
    when a side is shorter), under one of the 8 flips and 90-degree rotations."""
    pad = [(0, max(0, CROP - size)) for size in image.shape]
    if any(after for _, after in pad):
        image, truth = np.pad(image, pad, mode="reflect"), np.pad(truth, pad, mode="reflect")
    top = rng.integers(image.shape[0] - CROP + 1)
    left = rng.integers(image.shape[1] - CROP + 1)
    image = image[top:top + CROP, left:left + CROP]
    truth = truth[top:top + CROP, left:left + CROP]
    turns = int(rng.integers(4))
    image, truth = np.rot90(image, turns), np.rot90(truth, turns)
    if rng.random() < 0.5:
        image, truth = image[:, ::-1], truth[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(truth)


def run_torch(set_dir: Path, seed: int, steps: int = STEPS) -> dict:
    """Train the recipe on SET/train and score whole-image predictions on SET/test."""
    import torch

    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    train = [(normalize_percentile(read_grey(image)), read_foreground(mask).astype(np.float32))
             for _, image, mask in pairs(set_dir / "train")]
    model = torch_unet(torch, DEPTH, BASE_CHANNELS)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    bce = torch.nn.BCEWithLogitsLoss()

    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        crops = [random_crop(*train[rng.integers(len(train))], rng) for _ in range(BATCH)]
        x = torch.from_numpy(np.stack([c[0] for c in crops])[:, None])
        y = torch.from_numpy(np.stack([c[1] for c in crops])[:, None])
        logits = model(x)
        loss = bce(logits, y) + soft_dice_loss(torch, logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_seconds = time.perf_counter() - start

    model.eval()
    multiple = 2**DEPTH
    scores = {}
    with torch.no_grad():
        for stem, image_path, mask_path in pairs(set_dir / "test"):
            image = normalize_percentile(read_grey(image_path))
            height, width = image.shape
            padded = np.pad(image, [(0, -height % multiple), (0, -width % multiple)],
                            mode="reflect")
            logits = model(torch.from_numpy(padded)[None, None])[0, 0, :height, :width]
            scores[stem] = dice(logits.numpy() > 0, read_foreground(mask_path))
    return {"status": "ok", "dice": float(np.mean(list(scores.values()))),
            "per_image": scores, "train_seconds": train_seconds,
            "final_loss": float(loss.item()),
            "label": f"PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"}


# ---- tinyunet with its defaults --------------------------------------------------------------

def _error_line(done: subprocess.CompletedProcess) -> str:
    """The line of a failed command that says why (its last error line, else its last)."""
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [f"exit status {done.returncode}"])[-1]


def _tinyunet(args: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tinyunet", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ tinyunet {shlex.join(args)}\n{done.stdout}\n{done.stderr}")
    return done


def run_tinyunet(set_dir: Path, work: Path, timeout: float, train_args: list[str]) -> dict:
    """``tinyunet train`` (timed), ``evaluate --csv`` and ``predict`` on SET/test."""
    run_dir, test = work / "run", set_dir / "test"
    start = time.perf_counter()
    try:
        done = _tinyunet(["train", "--data", str(set_dir / "train"), "--out", str(run_dir),
                          *train_args], timeout, work / "train.log")
    except subprocess.TimeoutExpired:
        return {"status": f"train ran past the {timeout:.0f} s timeout",
                "train_seconds": time.perf_counter() - start}
    result = {"status": "ok", "train_seconds": time.perf_counter() - start}
    if done.returncode != 0:
        return {**result, "status": f"train failed: {_error_line(done)}"}

    checkpoint = str(run_dir)  # its best.npz, or an ensemble's members
    table = work / "test.csv"
    done = _tinyunet(["evaluate", "--checkpoint", checkpoint, "--data", str(test), "--csv",
                      str(table)], timeout, work / "evaluate.log")
    if done.returncode == 0:
        with open(table, newline="") as file:
            mean = next(row for row in csv.DictReader(file) if row["image"] == "mean")
        result["evaluate_dice"] = float(mean["dice"])
    else:
        result["status"] = f"evaluate failed: {_error_line(done)}"

    predicted = work / "predicted"
    done = _tinyunet(["predict", "--checkpoint", checkpoint, "--out", str(predicted),
                      str(test / "images")], timeout, work / "predict.log")
    if done.returncode != 0:
        result["status"] = f"predict failed: {_error_line(done)}"
        return result
    scores = {stem: dice(read_foreground(predicted / f"{stem}_mask.png"),
                         read_foreground(mask)) for stem, _, mask in pairs(test)}
    return {**result, "dice": float(np.mean(list(scores.values()))), "per_image": scores}


# ---- processes, table and RESULTS.md ------------------------------------------------------

def _has_torch(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True)
    return probe.returncode == 0


def run_child(method: str, python: str, set_dir: Path, work: Path, timeout: float,
              seed: int, steps: int = STEPS) -> dict:
    """``method`` (torch or otsu) in a process of its own; its result, or why none."""
    output = work / f"{method}.json"
    command = [python, str(Path(__file__).resolve()), "--child", method, "--set-dir",
               str(set_dir), "--json", str(output), "--seed", str(seed),
               "--torch-steps", str(steps)]
    # OpenMP threads that spin while they wait (PyTorch's default) burn the cores that a
    # shared machine's other processes need and stall each other: on 2 busy cores a
    # training step took 8 s so against 1 s waiting passively, as tinyunet's kernels do.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    # The child runs this file as a script; the repository root lets it import
    # benchmarks.torch_unet.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"ran past the {timeout:.0f} s timeout"}
    (work / f"{method}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"status": f"failed: {_error_line(done)}"}
    return json.loads(output.read_text())


def machine_line() -> str:
    """The CPU as lscpu names it, its logical CPUs and threads per core, and the OS."""
    fields = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return (f"{fields.get('Model name', platform.processor() or 'unknown CPU')}, "
            f"{fields.get('CPU(s)', os.cpu_count())} CPU(s), "
            f"{fields.get('Thread(s) per core', '?')} thread(s) per core (lscpu); "
            f"{platform.system()} {platform.release()}")


def write_synthetic_set(spec: str, root: Path) -> Path:
    """The set ``synthetic-COUNTxSIZE`` under ``root`` (module docstring); its folder."""
    from benchmarks.real_data_sets import write_pair
    from tinyunet.data import make_nuclei

    count, size = (int(part) for part in spec.lower().split("x"))
    set_dir = root / f"synthetic-{count}x{size}"
    for split, seeds in (("train", range(count)),
                         ("test", range(10_000, 10_000 + max(2, count // 10)))):
        for seed in seeds:
            image, ids = make_nuclei(np.random.default_rng(seed), size, size)
            write_pair(set_dir, split, f"n{seed:05d}", image, ids)
    return set_dir


def count_images(set_dir: Path) -> tuple[int, int]:
    return len(pairs(set_dir / "train")), len(pairs(set_dir / "test"))


def _format_row(name: str, method: str, result: dict) -> list[str]:
    dice_text = f"{result['dice']:.4f}" if "dice" in result else "-"
    evaluate = result.get("evaluate_dice")
    seconds = result.get("train_seconds")
    return [name, method, dice_text, f"{evaluate:.4f}" if evaluate is not None else "-",
            f"{seconds:.0f}" if seconds is not None else "-", result["status"]]


HEADER = ["set", "method", "mean Dice", "tinyunet evaluate Dice", "train s", "status"]


def results_section(results: dict) -> str:
    """The ``real_data`` section of RESULTS.md from every stored result."""
    rows, runs = [], []
    for name in sorted(results):
        for method in METHODS:
            if method in results[name]:
                result = results[name][method]
                rows.append(_format_row(name, method, result))
                load = (f" (1-minute load average {result['load']:.1f} at its start)"
                        if "load" in result else "")
                runs.append(f"- {name} / {method}: ended {result['date']}{load}; "
                            f"{result['machine']}; "
                            f"{result['train_images']} train and {result['test_images']} "
                            f"test images ({result['data']}); `{result['command']}`"
                            + (f"; {result['label']}" if "label" in result else ""))
    from benchmarks.common import table

    return "\n".join([
        "## Real microscopy (`python -m benchmarks.real_data`)",
        "",
        "Mean Dice over each set's test images (foreground = label > 0, the same "
        "definition for every method; 'tinyunet evaluate Dice' is the mean of `tinyunet "
        "evaluate --csv`, its own definition). Train seconds: the wall clock of `tinyunet "
        "train` (start-up, kernel compilation, validation and checkpoints included); the "
        "training loop alone for PyTorch; 0 for Otsu. The real sets' sources, sizes and "
        "splits: `benchmarks/real_data_sets.py`, which builds them; the synthetic ones: "
        "`--synthetic` in `benchmarks/real_data.py`.",
        "",
        table(HEADER, rows),
        "",
        "Runs:",
        "",
        *runs,
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", type=Path, metavar="DIR",
                        help="a set with train/ and test/ (repeat for more sets)")
    parser.add_argument("--set", action="append", metavar="NAME",
                        help="the set's name in the table (default: the folder's name)")
    parser.add_argument("--synthetic", action="append", default=[], metavar="COUNTxSIZE",
                        help="also a set of synthetic 16-bit nuclei, such as 20x1100 "
                        "(repeat for more)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} [all]")
    parser.add_argument("--torch-python", default=sys.executable, metavar="PATH",
                        help="the interpreter that runs the PyTorch recipe [this one]")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds each command may run [3600]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the PyTorch recipe [0]")
    parser.add_argument("--torch-steps", type=int, default=STEPS,
                        help=f"training steps of the PyTorch recipe [{STEPS}, the recipe's]")
    parser.add_argument("--train-args", default="", metavar="ARGS",
                        help="extra options for `tinyunet train` (default: none, the defaults)")
    parser.add_argument("--work", type=Path, metavar="DIR",
                        help="folder for runs, predictions and logs [a new temporary one]")
    parser.add_argument("--no-write", action="store_true",
                        help="print only; leave real_data.json and RESULTS.md")
    parser.add_argument("--child", choices=("torch", "otsu"), help=argparse.SUPPRESS)
    parser.add_argument("--set-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        start = time.perf_counter()
        result = (run_torch(args.set_dir, args.seed, args.torch_steps) if args.child == "torch"
                  else run_otsu(args.set_dir))
        result["process_seconds"] = time.perf_counter() - start
        args.json.write_text(json.dumps(result))
        return 0

    if not args.data and not args.synthetic:
        parser.error("give --data DIR or --synthetic COUNTxSIZE")
    data = args.data or []
    names = args.set or [path.name for path in data]
    if len(names) != len(data):
        parser.error("give one --set per --data, or none")
    for spec in args.synthetic:
        if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", spec.lower()):
            parser.error(f"--synthetic: Expect: COUNTxSIZE, such as 20x1100. Actual: {spec!r}.")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: Expect: some of {', '.join(METHODS)}. Actual: {unknown}.")
    if "torch" in methods and not _has_torch(args.torch_python):
        print(f"PyTorch is not installed for {args.torch_python}: skipping the PyTorch "
              "recipe (give --torch-python PATH of an interpreter that has it)")
        methods.remove("torch")
    work_root = args.work or Path(tempfile.mkdtemp(prefix="real_data_"))
    for spec in args.synthetic:
        print(f"writing the synthetic set {spec} to {work_root}", file=sys.stderr, flush=True)
        data.append(write_synthetic_set(spec, work_root))
        names.append(data[-1].name)
    train_args = shlex.split(args.train_args)
    machine = machine_line()
    command = "python -m benchmarks.real_data " + shlex.join(argv if argv is not None
                                                            else sys.argv[1:])

    results = json.loads(JSON_RESULTS.read_text()) if JSON_RESULTS.exists() else {}
    rows = []
    for name, set_dir in zip(names, data, strict=True):
        set_dir = set_dir.resolve()
        n_train, n_test = count_images(set_dir)
        for method in methods:
            work = work_root / name / method
            work.mkdir(parents=True, exist_ok=True)
            print(f"{name}: {method} ({n_train} train, {n_test} test images; logs in {work})",
                  file=sys.stderr, flush=True)
            load = os.getloadavg()[0]
            if method == "tinyunet":
                result = run_tinyunet(set_dir, work, args.timeout, train_args)
            else:
                python = args.torch_python if method == "torch" else sys.executable
                result = run_child(method, python, set_dir, work, args.timeout, args.seed,
                                   args.torch_steps)
            result.update(date=time.strftime("%Y-%m-%d %H:%M"), load=load, machine=machine,
                          command=command, data=str(set_dir), train_images=n_train,
                          test_images=n_test)
            if method == "torch" and args.torch_steps != STEPS:
                result["status"] += f" ({args.torch_steps} steps, not the recipe's {STEPS})"
            results.setdefault(name, {})[method] = result
            rows.append(_format_row(name, method, result))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)

    from benchmarks.common import table, write_section

    print(table(HEADER, rows))
    if not args.no_write:
        JSON_RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        write_section("real_data", results_section(results))
        print(f"wrote {JSON_RESULTS.name} and benchmarks/RESULTS.md (section 'real_data')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
