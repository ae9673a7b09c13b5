"""Reading images and label files, and decoding each dataset's label values into class ids ``0 <= c < n_classes``
with ``-1`` = ignore. A raw value a dataset must not hold is reported with the file name, never clipped.
"""

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from loader.images import open_rgb
from utils.errors import InputNotFoundError, InvalidInputError


class DatasetError(InvalidInputError):
    """Data on disk that cannot be used as it is (corrupt file, label value out of range...)."""


class DatasetNotFoundError(InputNotFoundError):
    """A dataset folder, list or file is missing; the message says what is expected."""


DATA_ERRORS = (DatasetError, DatasetNotFoundError)

_IGNORE, _INVALID = -1, -2  # lookup-table entries: ignore, a raw value that must not occur in a label file
LABEL_TABLES = json.loads(Path(__file__).with_name("labels.json").read_text())


class LabelDecoder:
    """Raw label file values -> class ids via a lookup table: ``table[v]`` is the class of raw value ``v``, ``-1``
    for ignore, ``-2`` for a value that must not occur (an error naming the file, never clipped)."""

    def __init__(self, table: np.ndarray, expected: str):
        self.table = np.asarray(table, dtype=np.int64)
        self.expected = expected

    def __call__(self, raw: np.ndarray, path: str) -> np.ndarray:
        """raw: [H, W] integer array as stored -> int64 [H, W] class ids (-1 = ignore)."""
        raw = raw.astype(np.int64, copy=False)
        inside = (raw >= 0) & (raw < len(self.table))
        label = self.table[np.where(inside, raw, 0)]
        bad = ~inside | (label == _INVALID)
        if bad.any():
            values = np.unique(raw[bad])
            shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 else "")
            problem = f"label file {path} holds values outside the dataset's range"
            raise DatasetError(f"{problem}: {shown} (expected {self.expected})")
        return label


def _decoder(expected: str, *entries, size: int = 256) -> LabelDecoder:
    """A decoder with ``table[index] = classes`` for each ``(index, classes)`` in order, other raw values invalid."""
    table = np.full(size, _INVALID, dtype=np.int64)
    for index, classes in entries:
        table[index] = classes
    return LabelDecoder(table, expected)


def coco_decoder(name: str) -> LabelDecoder:
    """COCO-Stuff fine ids (0-181, 255 = unlabelled) -> the classes of ``name``."""
    # ids absent from the table never occur in the annotations; read them as ignore
    classes = [_IGNORE if c is None else c for c in LABEL_TABLES["coco_fine_to_class"][name]]
    return _decoder("COCO-Stuff fine ids 0..181 or 255", (slice(len(classes)), classes), (255, _IGNORE))


def cityscapes_decoder() -> LabelDecoder:
    """Cityscapes labelIds -> labelId - 7 (27 classes); ids 0-6 (void) and 255 (other tools' maps) -> ignore.
    gtFine labelIds files hold 0..33 (license-plate polygons, id -1, are not drawn)."""
    classes = (slice(0, 7), _IGNORE), (slice(7, 34), np.arange(27)), (255, _IGNORE)
    return _decoder("Cityscapes labelIds 0..33 or 255", *classes)


def class_id_decoder(n_classes: int) -> LabelDecoder:
    """Class ids stored as they are (Pascal VOC, folder, toy): 0..n-1, 255 = ignore."""
    classes = (slice(n_classes), np.arange(n_classes)), (255, _IGNORE)
    return _decoder(f"class ids 0..{n_classes - 1} or 255", *classes, size=max(256, n_classes + 1))


def cropped_decoder(n_classes: int) -> LabelDecoder:
    """Crop-set labels, stored +1: 0 = ignore, c + 1 = class c."""
    classes = (0, _IGNORE), (slice(1, n_classes + 1), np.arange(n_classes))
    return _decoder(f"0 (ignore) or class id + 1 in 1..{n_classes}", *classes)


@contextmanager
def _reading(path: str, what: str):
    """A missing or unreadable ``what`` file becomes a one-line error naming it."""
    try:
        yield
    except FileNotFoundError:
        raise DatasetNotFoundError(f"{what} file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read {what} {path}: {err}") from None


def read_image(path: str) -> Image.Image:
    """The displayed RGB PIL image (EXIF orientation applied, 16-bit scaled; see loader/images.py)."""
    with _reading(path, "image"):
        return open_rgb(path)


def read_label(path: str) -> np.ndarray:
    """The raw integer values of a single-channel label PNG, [H, W]."""
    with _reading(path, "label"), Image.open(path) as image:
        image.load()
        mode, raw = image.mode, np.array(image)
    if raw.ndim != 2:
        raise DatasetError(f"label file {path} has mode {mode}; expected a single-channel PNG of class ids")
    return raw


def load_sample(image_path: str, label_path: str | None, decoder: LabelDecoder | None):
    """One full-resolution pair: (RGB PIL image, int64 [H, W] class ids (-1 = ignore) or None)."""
    image = read_image(image_path)
    if label_path is None:
        return image, None
    label = decoder(read_label(label_path), label_path)
    if label.shape != (image.height, image.width):
        sizes = f"{label.shape[1]}x{label.shape[0]} but its image {image_path} is {image.width}x{image.height}"
        raise DatasetError(f"label file {label_path} is {sizes}")
    return image, label
