"""Reading image files exactly as stored: PNG (Pillow), TIFF (tifffile) and NPY (numpy).

What a file becomes is either exactly its data or a ``DataError`` naming the file:

- TIFF keeps every dtype (uint8/16/32, int8/16/32, float32/64, bool). A file with
  several pages is refused, unless its pages are the channels of one image (an
  ImageJ/OME channel axis 'C', or an array tifffile wrote with its shape), or ``page``
  picks one page. Z-stacks, time series and OME-TIFF series of more than one plane
  per channel are refused with their page count and series shapes.
- PNG: 8-bit and 16-bit grey keep their depth; a palette (indexed-colour) PNG is read
  as its indices, never as colours (label tools save class masks this way, ImageJ saves
  8-bit data with a colour table this way). Pillow reads 16-bit colour PNG only as
  8-bit, so such a file is refused (save it as TIFF to keep 16 bits).
- NPY: the array as saved.

The channel rule (``to_chw``): an array is (H, W); or channels-last (H, W, C) when its
last axis is 1-4 long and the other two are longer than 4; or channels-first (C, H, W)
when its first axis is 1-4 long and the other two are longer than 4. Any other shape
is an error naming the file and the shape. No channel is ever dropped: an alpha
channel is a channel. ``channels`` (see ``parse_channels``) keeps a chosen subset.

Shapes: ``read_array`` returns the file's array, (H, W) or 3-D in the file's own
layout; ``read_image`` returns (C, H, W) float32, normalised per channel.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EXTENSIONS = (".png", ".tif", ".tiff", ".npy")
MAX_CHANNELS = 4
# TIFF axes (tifffile's letters) that may span an image's pages: channels ('C', 'S')
# and the shape tifffile itself wrote ('Q'). Any other axis (Z, T, I, ...) is a stack.
CHANNEL_AXES = "CSQ"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_PALETTE = 3  # IHDR colour type of an indexed-colour PNG
PNG_COLOUR_TYPES = {2: "RGB", 4: "grey with alpha", 6: "RGBA"}
# Pillow modes of a PNG whose pixels np.asarray gives unchanged (16-bit grey comes as
# 'I;16' in recent Pillow, as 'I' in older ones).
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I")


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names it."""


def require_pillow(purpose: str):
    """The PIL.Image module, or an ImportError that says how to install it."""
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs Pillow, which is not installed. "
            "Install it with: pip install 'tinyunet[images]'"
        ) from error
    return Image


def require_tifffile(purpose: str):
    """The tifffile module, or an ImportError that says how to install it."""
    try:
        import tifffile
    except ImportError as error:
        raise ImportError(
            f"{purpose} needs tifffile, which is not installed. "
            "Install it with: pip install 'tinyunet[images]'"
        ) from error
    return tifffile


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Per-channel (x - p_low) / (p_high - p_low) of a (C, H, W) image, as float32.

    Not clipped, so that bright structures keep their contrast. A flat channel maps to 0.
    """
    image = image.astype(np.float32, copy=False)
    lo = np.percentile(image, low, axis=(1, 2), keepdims=True)
    hi = np.percentile(image, high, axis=(1, 2), keepdims=True)
    span = np.where(hi - lo > 1e-12, hi - lo, 1.0)
    return ((image - lo) / span).astype(np.float32)


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None when it is no PNG."""
    with open(path, "rb") as file:
        head = file.read(26)
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def is_palette(path: Path) -> bool:
    """Whether ``path`` is a palette (indexed-colour) PNG, whose pixels are indices."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        return False
    header = _png_header(path)
    return header is not None and header[1] == PNG_PALETTE


def _read_png(path: Path, page: int | None) -> np.ndarray:
    header = _png_header(path)
    if header is not None and header[0] == 16 and header[1] in PNG_COLOUR_TYPES:
        raise DataError(
            f"{path}: Expect: a PNG Pillow reads faithfully (8-bit, or 16-bit grey); save "
            "16-bit colour as TIFF. Actual: 16-bit "
            f"{PNG_COLOUR_TYPES[header[1]]}, which Pillow would cut to 8 bits."
        )
    Image = require_pillow(f"reading {path.name}")
    with Image.open(path) as opened:
        frames = getattr(opened, "n_frames", 1)
        if frames > 1:
            if page is None:
                raise DataError(
                    f"{path}: Expect: one image. Actual: an animated PNG of {frames} frames; "
                    f"read one with --page N (page=N), N in 0..{frames - 1}."
                )
            _check_page(path, page, frames)
            opened.seek(page)
        mode = opened.mode
        if mode not in PNG_MODES:
            raise DataError(
                f"{path}: Expect: a PNG of mode {', '.join(PNG_MODES)}. Actual: mode {mode}."
            )
        array = np.asarray(opened)
    if mode == "I" or array.dtype.byteorder == ">":
        # 16-bit grey: older Pillow widens it to int32, 'I;16B' is big-endian.
        array = array.astype(np.uint16)
    return array


def _check_page(path: Path, page: int, pages: int) -> None:
    if not 0 <= page < pages:
        raise DataError(f"{path}: Expect: page in 0..{pages - 1}. Actual: page {page}.")


def _describe_series(tif) -> str:
    kind = "OME-TIFF series" if tif.is_ome else "series"
    shown = [f"{kind} {i}: shape {tuple(s.shape)}, axes '{s.axes}'"
             for i, s in enumerate(tif.series[:3])]
    if len(tif.series) > 3:
        shown.append(f"{len(tif.series) - 3} more series")
    return "; ".join(shown)


def _read_tiff(path: Path, page: int | None) -> np.ndarray:
    tifffile = require_tifffile(f"reading {path.name}")
    with tifffile.TiffFile(path) as tif:
        pages = len(tif.pages)
        if pages > 1 and page is not None:
            _check_page(path, page, pages)
            return tif.pages[page].asarray()
        series = tif.series[0]
        one_image = len(tif.series) == 1 and (
            pages == 1
            or (len(series.shape) == 3 and _layout(series.shape) is not None
                and all(axis in CHANNEL_AXES + "YX" for axis in series.axes))
        )
        if not one_image:
            raise DataError(
                f"{path}: Expect: one 2-D image (one page, or pages that are its channels). "
                f"Actual: {pages} pages ({_describe_series(tif)}); read one with "
                f"--page N (page=N), N in 0..{pages - 1}."
            )
        return series.asarray()


def read_array(path: Path, page: int | None = None) -> np.ndarray:
    """The pixels of an image file exactly as stored: dtype and layout kept.

    (H, W), or 3-D in the file's layout ((H, W, C) or (C, H, W); see ``to_chw``). A
    palette PNG gives its indices. ``page`` picks one page of a file with several (TIFF
    pages, animated PNG frames); files with one page ignore it.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise DataError(f"{path}: Expect: one of {EXTENSIONS}. Actual: '{suffix}'.")
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        elif suffix == ".png":
            array = _read_png(path, page)
        else:
            array = _read_tiff(path, page)
    except (ImportError, DataError):
        raise
    except Exception as error:  # Pillow, tifffile and numpy raise many types for a bad file
        if "imagecodecs" in str(error):
            raise DataError(
                f"{path}: unreadable without the imagecodecs package ({error}). "
                "Install it with: pip install imagecodecs"
            ) from error
        raise DataError(f"{path}: unreadable ({type(error).__name__}: {error})") from error
    if array.dtype.kind not in "biuf":
        raise DataError(f"{path}: Expect: numeric pixels. Actual: dtype {array.dtype}.")
    if array.size == 0:
        raise DataError(f"{path}: Expect: pixels. Actual: an empty array {array.shape}.")
    return array


def _layout(shape: tuple[int, ...]) -> str | None:
    """'HW', 'HWC' or 'CHW' by the channel rule; None when the shape fits none."""
    if len(shape) == 2:
        return "HW"
    if len(shape) == 3:
        if shape[2] <= MAX_CHANNELS < min(shape[0], shape[1]):
            return "HWC"
        if shape[0] <= MAX_CHANNELS < min(shape[1], shape[2]):
            return "CHW"
    return None


def to_chw(array: np.ndarray, name) -> np.ndarray:
    """``array`` as (C, H, W) by the channel rule (module docstring); a view, not a copy.

    ``name`` (the file) is named in the error for a shape that fits no layout.
    """
    layout = _layout(array.shape)
    if layout == "HW":
        return array[None]
    if layout == "HWC":
        return np.moveaxis(array, -1, 0)
    if layout == "CHW":
        return array
    raise DataError(
        f"{name}: Expect: an image (H, W), (H, W, C) or (C, H, W) with C in 1..{MAX_CHANNELS} "
        f"and sides longer than {MAX_CHANNELS}. Actual: shape {tuple(array.shape)}."
    )


def parse_channels(text: str) -> tuple[int, ...]:
    """Channel indices from text such as '0,2' (the CLI's --channels), each at most once."""
    parts = [part.strip() for part in text.split(",")]
    if not all(re.fullmatch(r"[0-9]+", part) for part in parts):
        raise ValueError(
            f"--channels: Expect: channel indices separated by commas, such as 0,2. "
            f"Actual: '{text}'."
        )
    indices = tuple(int(part) for part in parts)
    if len(set(indices)) != len(indices):
        raise ValueError(f"--channels: Expect: each channel once. Actual: '{text}'.")
    return indices


def select_channels(image: np.ndarray, channels: Sequence[int] | None, name) -> np.ndarray:
    """The ``channels`` of ``image`` (C, H, W) in the order given; all of them for None."""
    if channels is None:
        return image
    count = image.shape[0]
    if not channels or any(not 0 <= c < count for c in channels):
        raise DataError(
            f"{name}: Expect: channel indices in 0..{count - 1} (the file has {count} "
            f"channel(s)). Actual: channels {tuple(channels)}."
        )
    return image[list(channels)]


def read_image(path: Path, channels: Sequence[int] | None = None,
               page: int | None = None) -> np.ndarray:
    """A normalised (C, H, W) float32 image: the file's channels (or ``channels`` of them).

    ``page`` picks a page of a multi-page file (see ``read_array``).
    """
    image = select_channels(to_chw(read_array(path, page), path), channels, path)
    image = image.astype(np.float32)
    if not np.isfinite(image).all():
        raise DataError(f"{path}: the image holds NaN or infinite values")
    return normalize_percentile(image)


def match_channels(image: np.ndarray, channels: int, name) -> np.ndarray:
    """``image`` (C, H, W) with a model's channel count: grey is repeated to RGB, RGB is
    averaged to grey; anything else is a DataError naming ``name`` (a file, or the caller).
    """
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1:
        return np.repeat(image, channels, axis=0)
    if channels == 1:
        return image.mean(axis=0, keepdims=True)
    raise DataError(f"{name}: Expect: {channels} channel(s) for this model (or 1). "
                    f"Actual: {image.shape[0]}.")
