"""Reading photographs as their viewer shows them: EXIF orientation, bit depth, palette, alpha.

Every image of the project (training, evaluation and ``predict.py``) goes through :func:`to_display_rgb`, so that a
label drawn on the displayed picture lines up with the pixels the network sees:

* the EXIF orientation tag is applied (a phone photo stored sideways comes out upright);
* 16-bit and 32-bit integer images are scaled by their type's value range (65535 -> 255), not clipped; float
  images by their own minimum and maximum;
* palette images take their palette's colours; transparent pixels (alpha, or a palette's transparent index)
  are composited over white.
"""

import glob
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

from utils.errors import InputNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_WIDE_INTEGER_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _scaled_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """values: [H, W] numbers -> uint8 [H, W], ``low`` -> 0 and ``high`` -> 255 (clipped)."""
    scaled = (values.astype(np.float64) - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """A single-channel 16/32-bit integer or float image -> uint8 [H, W] by its value range."""
    values = np.asarray(image)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        return _scaled_to_uint8(np.nan_to_num(values, nan=low), low, high)
    return _scaled_to_uint8(values, min(0.0, float(values.min())), max(65535.0, float(values.max())))


def to_display_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image -> the RGB image a viewer displays (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_INTEGER_MODES or image.mode == "F":
        return Image.fromarray(_gray_to_uint8(image)).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str) -> Image.Image:
    """The displayed RGB image of a file; raises FileNotFoundError, OSError or ValueError on failure."""
    with Image.open(path) as image:
        image.load()
        return to_display_rgb(image)


def warn_broken_links(paths: list[str], where: str) -> list[str]:
    """Warns about (and returns) the ``paths`` that are symbolic links to nothing (dangling, or a loop)."""
    broken = [path for path in paths if os.path.islink(path) and not os.path.exists(path)]
    if broken:
        warnings.warn(f"{len(broken)} broken link(s) {where} left out, e.g. {broken[0]} (dangling or a loop)")
    return broken


def list_images(inputs: str) -> list[str]:
    """The image files named by ``inputs`` as absolute paths: one file (whatever its extension), a folder's
    or a glob's files with an image extension (:data:`IMAGE_EXTENSIONS`), sorted; FileNotFoundError if none."""
    if os.path.isfile(inputs):
        return [os.path.abspath(inputs)]
    folder = os.path.isdir(inputs)
    files = [os.path.join(inputs, f) for f in os.listdir(inputs)] if folder else glob.glob(inputs, recursive=True)
    files = sorted(f for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
    what = f"in the folder {inputs}" if folder else f"matching {inputs}"
    broken = warn_broken_links(files, what)
    files = [os.path.abspath(f) for f in files if os.path.isfile(f)]
    if not files:
        found = " but broken links" if broken else ""
        raise InputNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) {what}{found}")
    return files


def output_stems(files: list[str]) -> list[str]:
    """Unique output names for input files: their path below the inputs' common folder, extension kept (``/a/x.jpg``
    and ``/a/x.png`` -> ``x.jpg``, ``x.png``; ``/a/p/x.jpg`` and ``/a/q/x.jpg`` -> ``p/x.jpg``, ``q/x.jpg``)."""
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [os.path.relpath(f, root) for f in files]
