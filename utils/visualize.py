"""Pictures of an evaluation: colour maps, per-image panels, loss curves, confusion matrix, overlays, legends.

Figures use matplotlib's ``Figure`` (Agg), never ``pyplot``: no global backend, no window; every file is written
atomically. Colour maps follow the reference: Cityscapes has the official colours of its 27 evaluated label ids
(7..33), every other dataset the PASCAL VOC palette, whose class 0 is black like the ignore colour.
"""

import json
import math
import os

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from utils.atomic import atomic_save_image, atomic_write, atomic_write_bytes

# Official Cityscapes colours of label ids 7 (road) .. 33 (bicycle): the 27 classes used.
# fmt: off
CITYSCAPES_COLORS = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# fmt: on
DEFAULT_PANEL_TITLES = ("image", "ground truth", "cluster", "CRF", "Hungarian")


def colormap(n_classes):
    """The PASCAL VOC palette for ids 0..n-1 -> uint8 [n, 3], distinct for n <= 2**24: bit ``3j + c`` of the
    id sets bit ``7 - j`` of channel ``c`` (0 black, 1 dark red, 2 dark green, ...)."""
    if not 1 <= n_classes <= 2**24:
        raise ValueError(f"colormap needs 1 <= n_classes <= 2**24, got {n_classes}")
    ids = np.arange(n_classes, dtype=np.int64)
    colors = np.zeros((n_classes, 3), dtype=np.int64)
    for shift in range(7, -1, -1):
        colors |= ((ids[:, None] >> np.arange(3)) & 1) << shift
        ids = ids >> 3
    return colors.astype(np.uint8)


def dataset_colormap(name, n_classes):
    """The colour map a dataset's pictures use -> uint8 [n_classes, 3]."""
    if name != "cityscapes":
        return colormap(n_classes)
    if n_classes != len(CITYSCAPES_COLORS):
        raise ValueError(f"the cityscapes colour map has {len(CITYSCAPES_COLORS)} classes, got n_classes={n_classes}")
    return np.array(CITYSCAPES_COLORS, dtype=np.uint8)


def _numpy(x):
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def colorize(label, cmap, ignore_color=(0, 0, 0)):
    """label: ids [H, W] (tensor or array; negative = ignore) -> uint8 RGB [H, W, 3]."""
    label, cmap = _numpy(label), np.asarray(cmap, dtype=np.uint8)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"colorize expects an integer map [H, W], got {label.dtype} array of shape {label.shape}")
    if label.size and label.max() >= len(cmap):
        raise ValueError(f"id {int(label.max())} is outside the colour map of {len(cmap)} colours")
    out = cmap[np.clip(label, 0, None)]
    out[label < 0] = np.asarray(ignore_color, dtype=np.uint8)
    return out


def _save_figure(fig, path, dpi):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_panel(
    path, image_uint8, gt, cluster, crf, mapped, cmap, titles=DEFAULT_PANEL_TITLES, gap=4, title_height=24, dpi=100
):
    """Writes one PNG row: image | ground truth | raw cluster map | CRF map | Hungarian map.

    image_uint8: RGB [H, W, 3]; gt, cluster, crf, mapped: ids [H, W] (a ``None`` map and its title are left out).
    For ``n`` pictures ``gap`` pixels apart under a title band the PNG is ``(n·W + (n−1)·gap) × (H + title_height)``.
    """
    image = _numpy(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"save_panel expects an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    if len(titles) != 5:
        raise ValueError(f"save_panel needs 5 titles (image, gt, cluster, crf, mapped), got {len(titles)}")
    height, width = image.shape[:2]
    pictures, names = [image], [titles[0]]
    for label, title in zip((gt, cluster, crf, mapped), titles[1:]):
        if label is not None:
            pictures.append(colorize(label, cmap))
            names.append(title)
            if pictures[-1].shape != image.shape:
                raise ValueError(f"map for '{title}' has shape {pictures[-1].shape[:2]}, the image {image.shape[:2]}")
    total_width, total_height = len(pictures) * width + (len(pictures) - 1) * gap, height + title_height
    fig = Figure(figsize=(total_width / dpi, total_height / dpi), dpi=dpi, facecolor="white")
    title_y = 1 - title_height / 2 / total_height
    for i, (picture, name) in enumerate(zip(pictures, names)):
        x0 = i * (width + gap)
        fig.figimage(picture, xo=x0, yo=0, origin="upper")
        fig.text((x0 + width / 2) / total_width, title_y, name, ha="center", va="center", fontsize=9)
    _save_figure(fig, path, dpi)


def _read_records(source):
    if not isinstance(source, (str, os.PathLike)):
        return list(source)
    records = []
    with open(source) as file:
        for line_number, line in enumerate(file, start=1):
            try:
                if line.strip():
                    records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{source}:{line_number}: not a JSON line ({error.msg})") from None
    return records


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_losses(records, out_png, keys=None, x_key="step"):
    """Plots loss curves of ``records`` (a JSON-lines path or a list of dicts) against ``x_key`` (the record
    index if absent), one subplot per key: by default every numeric key but ``x_key`` and ``epoch``."""
    records = [r for r in _read_records(records) if isinstance(r, dict)]
    if keys is None:
        numeric = (k for r in records for k, v in r.items() if _is_number(v) and k not in (x_key, "epoch"))
        keys = list(dict.fromkeys(numeric))
    if not keys:
        raise ValueError(f"no numeric values to plot in {len(records)} records")
    fig = Figure(figsize=(6.0, 2.2 * len(keys)), dpi=100)
    axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for ax, key in zip(axes, keys):
        points = [(r.get(x_key, i), r[key]) for i, r in enumerate(records) if _is_number(r.get(key))]
        if points:
            ax.plot(*zip(*points), linewidth=1.0)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(x_key)
    fig.tight_layout()
    _save_figure(fig, out_png, 100)


def plot_confusion(histogram, class_names, out_png, normalize=True):
    """Draws a confusion matrix (ground truth on the rows) of a [C, C] histogram with rows predicted class, columns
    label (``UnsupervisedMetrics.matched_histogram``); ``normalize`` divides each row by its class's pixels."""
    hist = _numpy(histogram)
    if hist.ndim != 2 or hist.shape[0] != hist.shape[1] or hist.shape[0] != len(class_names):
        raise ValueError(f"expected a [C, C] histogram with C={len(class_names)} class names, got shape {hist.shape}")
    matrix = hist.T.astype(np.float64)
    if normalize:
        row_sums = matrix.sum(axis=1, keepdims=True)
        matrix = np.divide(matrix, row_sums, out=np.zeros_like(matrix), where=row_sums > 0)
    n = len(class_names)
    side = max(4.0, 0.3 * n + 2.0)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.subplots()
    shown = ax.imshow(matrix, cmap="viridis", interpolation="nearest", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), labels=class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), labels=class_names, fontsize=7)
    ax.set(xlabel="prediction", ylabel="ground truth")
    fig.tight_layout()
    _save_figure(fig, out_png, 100)


def save_iou_table(iou, class_names, path_md):
    """Writes per-class IoU (percent, NaN = class absent) as Markdown, with the mean over classes; returns the text."""
    if len(iou) != len(class_names):
        raise ValueError(f"got {len(iou)} IoU values for {len(class_names)} class names")
    shown = ["n/a" if math.isnan(v) else f"{v:.2f}" for v in iou]
    present = [v for v in iou if not math.isnan(v)]
    mean = f"{sum(present) / len(present):.2f}" if present else "n/a"
    rows = [f"| {i} | {name} | {value} |" for i, (name, value) in enumerate(zip(class_names, shown))]
    text = "\n".join(["| id | class | IoU (%) |", "|---:|:---|---:|", *rows, f"| | **mean** | **{mean}** |"]) + "\n"
    atomic_write_bytes(path_md, text.encode("utf-8"))
    return text


def save_png(path, pixels, compress_level=6):
    """Writes a uint8 array ([H, W] or [H, W, 3]) as a PNG, atomically (zlib level 0-9)."""
    array = np.ascontiguousarray(pixels)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"save_png expects uint8 [H, W] or [H, W, 3], got {array.dtype} {array.shape}")
    atomic_save_image(array, path, "PNG", compress_level=compress_level)


def overlay(image_uint8, colored, alpha=0.5):
    """image_uint8, colored: RGB uint8 [H, W, 3] -> (1 - alpha) * image + alpha * colored, uint8, in integer
    arithmetic with ``alpha`` in 1/256 steps (a 12-MP photo in a fraction of a second)."""
    image, colors = np.asarray(image_uint8), np.asarray(colored)
    if image.shape != colors.shape:
        raise ValueError(f"overlay needs equal shapes, got {image.shape} and {colors.shape}")
    weight = int(round(alpha * 256))
    mixed = (256 - weight) * image.astype(np.uint16) + weight * colors.astype(np.uint16) + 128
    return (mixed >> 8).astype(np.uint8)


def save_legend(path, names, cmap, title=None, dpi=100):
    """Writes a PNG with one colour swatch and name per class: ``names[i]`` drawn in ``cmap[i]``."""
    cmap = np.asarray(cmap, dtype=np.uint8)
    if len(names) > len(cmap):
        raise ValueError(f"{len(names)} names but only {len(cmap)} colours")
    columns = 1 if len(names) <= 14 else 2 if len(names) <= 40 else 3
    rows = math.ceil(len(names) / columns) if names else 1
    row_height, top = 0.28, 0.4 if title else 0.1  # inches
    height = rows * row_height + top + 0.1
    fig = Figure(figsize=(columns * 2.6, height), dpi=dpi, facecolor="white")
    if title:
        fig.text(0.5, 1 - 0.2 / height, title, ha="center", va="center", fontsize=10, weight="bold")
    for i, name in enumerate(names):
        column, row = divmod(i, rows)
        x, y = column / columns, 1 - (top + (row + 0.5) * row_height) / height
        corner, size = (x + 0.03 / columns, y - 0.09 / height), (0.12 / columns, 0.18 / height)
        style = dict(facecolor=cmap[i] / 255.0, edgecolor="black", linewidth=0.5)
        fig.patches.append(Rectangle(corner, *size, transform=fig.transFigure, **style))
        fig.text(x + 0.2 / columns, y, f"{i}: {name}", ha="left", va="center", fontsize=8)
    _save_figure(fig, path, dpi)
