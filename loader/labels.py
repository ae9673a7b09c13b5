"""Reading images and label files, and decoding each dataset's label values into class ids.

Labels are class ids ``0 <= c < n_classes`` with ``-1`` = ignore. A raw value a dataset must
not hold is reported with the file name, never clipped.
"""

import json
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

_IGNORE = -1
_INVALID = -2  # lookup-table entry of a raw value that must not occur in a label file

LABEL_TABLES = json.loads((Path(__file__).with_name("labels.json")).read_text())


class LabelDecoder:
    """Raw label file values -> class ids via a lookup table; other values are an error.

    ``table[v]`` is the class of raw value ``v``, ``-1`` for ignore, ``-2`` for a value that
    must not occur (reported with the file name, never clipped).
    """

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
            raise DatasetError(
                f"label file {path} holds values outside the dataset's range: {shown} (expected {self.expected})"
            )
        return label


def _table(size: int = 256) -> np.ndarray:
    return np.full(size, _INVALID, dtype=np.int64)


def coco_decoder(name: str) -> LabelDecoder:
    """COCO-Stuff fine ids (0-181, 255 = unlabelled) -> the classes of ``name``."""
    table = _table()
    fine_to_class = LABEL_TABLES["coco_fine_to_class"][name]
    # ids absent from the table never occur in the annotations; read them as ignore
    table[: len(fine_to_class)] = [_IGNORE if c is None else c for c in fine_to_class]
    table[255] = _IGNORE
    return LabelDecoder(table, "COCO-Stuff fine ids 0..181 or 255")


def cityscapes_decoder() -> LabelDecoder:
    """Cityscapes labelIds -> labelId - 7 (27 classes); ids 0-6 (void) -> ignore.

    gtFine labelIds files hold 0..33 (license-plate polygons, id -1, are not drawn);
    255 is accepted as ignore for label maps written by other tools.
    """
    table = _table()
    table[:7] = _IGNORE
    table[7:34] = np.arange(27)
    table[255] = _IGNORE
    return LabelDecoder(table, "Cityscapes labelIds 0..33 or 255")


def class_id_decoder(n_classes: int) -> LabelDecoder:
    """Class ids stored as they are (Pascal VOC, folder, toy): 0..n-1, 255 = ignore."""
    table = _table(max(256, n_classes + 1))
    table[:n_classes] = np.arange(n_classes)
    table[255] = _IGNORE
    return LabelDecoder(table, f"class ids 0..{n_classes - 1} or 255")


def cropped_decoder(n_classes: int) -> LabelDecoder:
    """Crop-set labels, stored +1: 0 = ignore, c + 1 = class c."""
    table = _table()
    table[0] = _IGNORE
    table[1 : n_classes + 1] = np.arange(n_classes)
    return LabelDecoder(table, f"0 (ignore) or class id + 1 in 1..{n_classes}")


def read_image(path: str) -> Image.Image:
    """The displayed RGB PIL image (EXIF orientation applied, 16-bit scaled; see loader/images.py).

    A missing or unreadable file is a one-line error naming it.
    """
    try:
        return open_rgb(path)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


def read_label(path: str) -> np.ndarray:
    """The raw integer values of a single-channel label PNG, [H, W]."""
    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            raw = np.array(image)
    except FileNotFoundError:
        raise DatasetNotFoundError(f"label file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetError(f"cannot read label {path}: {err}") from None
    if raw.ndim != 2:
        raise DatasetError(f"label file {path} has mode {mode}; expected a single-channel PNG of class ids")
    return raw


def load_sample(
    image_path: str, label_path: str | None, decoder: LabelDecoder | None
) -> tuple[Image.Image, np.ndarray | None]:
    """One full-resolution pair: (RGB PIL image, int64 [H, W] class ids (-1 = ignore) or None)."""
    image = read_image(image_path)
    if label_path is None:
        return image, None
    label = decoder(read_label(label_path), label_path)
    if label.shape != (image.height, image.width):
        raise DatasetError(
            f"label file {label_path} is {label.shape[1]}x{label.shape[0]} but its image "
            f"{image_path} is {image.width}x{image.height}"
        )
    return image, label
