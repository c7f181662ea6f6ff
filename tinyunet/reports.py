"""What a training run shows and leaves behind: the progress bar, the metrics history
(CSV and JSON), the PNG plot of loss and Dice curves and the PNG grid of validation
samples (image | truth | prediction), drawn with numpy and Pillow only.

Shapes: images (H, W) or (C, H, W) floats; label maps (H, W) integers.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .files import atomic_write


class ProgressBar:
    """A one-line progress bar on stderr: steps, loss and images per second.

    On a terminal the line is redrawn in place; in a log (not a terminal) only the
    finished line is written, once.
    """

    def __init__(self, total: int, label: str, stream=None, width: int = 24):
        self.total, self.label, self.width = total, label, width
        self.stream = stream or sys.stderr
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.images = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def line(self, loss: float) -> str:
        filled = int(self.width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.label} [{bar}] {self.done}/{self.total} "
                f"loss {loss:.4f} {rate:.1f} img/s")

    def update(self, images: int, loss: float):
        self.done += 1
        self.images += images
        now = time.perf_counter()
        if self.live and (now - self.last_draw > 0.1 or self.done == self.total):
            self.stream.write("\r" + self.line(loss))
            self.stream.flush()
            self.last_draw = now

    def close(self, loss: float):
        prefix = "\r" if self.live else ""
        self.stream.write(prefix + self.line(loss) + "\n")
        self.stream.flush()


PALETTE = np.array([[0, 0, 0], [255, 255, 255], [235, 70, 60], [70, 140, 255],
                    [250, 200, 40], [80, 200, 120], [200, 90, 220], [120, 120, 120]],
                   dtype=np.uint8)


def colour_labels(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8: 0 black, 1 white, 2 red, then more colours."""
    return PALETTE[np.asarray(labels) % len(PALETTE)]


def grey_to_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) normalised image -> (H, W, 3) uint8 (values clipped to [0, 1])."""
    pixels = np.clip(image if image.shape[0] == 3 else image[:1].repeat(3, 0), 0, 1)
    return (np.moveaxis(pixels, 0, -1) * 255).round().astype(np.uint8)


def save_sample_grid(path, rows, cell: int = 128):
    """A PNG with one row per sample: image | truth | prediction.

    ``rows``: list of (image (C, H, W), truth (H, W), prediction (H, W)).
    """
    from .data.images import require_pillow

    Image = require_pillow("writing sample PNGs")
    from PIL import ImageDraw

    header, gap = 16, 4
    canvas = Image.new("RGB", (3 * cell + 4 * gap, header + len(rows) * (cell + gap) + gap),
                       (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(("image", "truth", "prediction")):
        draw.text((gap + column * (cell + gap) + 4, 3), title, fill=(230, 230, 230))
    for row, (image, truth, prediction) in enumerate(rows):
        panels = (grey_to_rgb(image), colour_labels(truth), colour_labels(prediction))
        for column, panel in enumerate(panels):
            tile = Image.fromarray(panel).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (gap + column * (cell + gap), header + row * (cell + gap)))
    atomic_write(path, lambda file: canvas.save(file, format="PNG"))


def _nice_ticks(low: float, high: float, count: int = 5) -> np.ndarray:
    """About ``count`` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(low / step), math.ceil(high / step)
    return np.arange(first, last + 1) * step


def _draw_panel(draw, box, title, epochs, series):
    """One line chart in ``box`` (left, top, right, bottom): ``series`` is
    [(label, values, colour)] against ``epochs``.
    """
    left, top, right, bottom = box
    plot_l, plot_t, plot_r, plot_b = left + 50, top + 28, right - 16, bottom - 30
    values = np.concatenate([np.asarray(v, dtype=float) for _, v, _ in series])
    values = values[np.isfinite(values)]
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    ticks = _nice_ticks(low, high)
    y_low, y_high = float(ticks[0]), float(ticks[-1])
    x_low, x_high = min(epochs), max(max(epochs), min(epochs) + 1)

    def to_xy(epoch, value):
        x = plot_l + (epoch - x_low) / (x_high - x_low) * (plot_r - plot_l)
        y = plot_b - (value - y_low) / (y_high - y_low) * (plot_b - plot_t)
        return x, y

    draw.text((plot_l, top + 6), title, fill=(0, 0, 0))
    for tick in ticks:
        _, y = to_xy(x_low, tick)
        draw.line([(plot_l, y), (plot_r, y)], fill=(225, 225, 225))
        draw.text((left + 8, y - 6), f"{tick:.3g}", fill=(60, 60, 60))
    for epoch in _nice_ticks(x_low, x_high, 6):
        if epoch != int(epoch) or not x_low <= epoch <= x_high:
            continue
        x, _ = to_xy(epoch, y_low)
        draw.line([(x, plot_b), (x, plot_b + 4)], fill=(60, 60, 60))
        draw.text((x - 6, plot_b + 6), str(int(epoch)), fill=(60, 60, 60))
    draw.rectangle([plot_l, plot_t, plot_r, plot_b], outline=(60, 60, 60))
    draw.text(((plot_l + plot_r) // 2 - 14, bottom - 14), "epoch", fill=(60, 60, 60))
    for index, (label, series_values, colour) in enumerate(series):
        points = [to_xy(e, v) for e, v in zip(epochs, series_values, strict=True)
                  if math.isfinite(v)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        # The legend sits in the header row, right of the title, clear of the lines.
        legend_x = plot_l + 110 + 100 * index
        draw.line([(legend_x, top + 12), (legend_x + 18, top + 12)], fill=colour, width=2)
        draw.text((legend_x + 22, top + 6), label, fill=(0, 0, 0))


def save_curves(path, history: list[dict]):
    """A PNG with two charts: train/validation loss and validation Dice/IoU per epoch."""
    from .data.images import require_pillow

    Image = require_pillow("writing the training-curve PNG")
    from PIL import ImageDraw

    epochs = [row["epoch"] for row in history]
    canvas = Image.new("RGB", (800, 300), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    _draw_panel(draw, (0, 0, 400, 300), "loss", epochs, [
        ("train", [row["train_loss"] for row in history], (30, 100, 220)),
        ("validation", [row["val_loss"] for row in history], (240, 130, 30)),
    ])
    _draw_panel(draw, (400, 0, 800, 300), "validation score", epochs, [
        ("Dice", [row["val_dice"] for row in history], (40, 160, 70)),
        ("IoU", [row["val_iou"] for row in history], (150, 60, 200)),
    ])
    atomic_write(path, lambda file: canvas.save(file, format="PNG"))


def write_history(out: Path, history: list[dict]):
    """history.json and history.csv: one row per epoch (each written whole or not at all)."""
    text = json.dumps(history, indent=1) + "\n"
    atomic_write(out / "history.json", lambda file: file.write(text.encode()))
    if history:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
        atomic_write(out / "history.csv", lambda file: file.write(table.getvalue().encode()))
