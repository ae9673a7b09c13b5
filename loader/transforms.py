"""Image and label transforms of the evaluation and training data (SPEC §8).

Geometry is done on PIL images with torchvision's functional resize / center crop, as the reference does, so that
sizes and crop offsets agree pixel for pixel, with nearest interpolation:

* ``"center"`` (COCO-Stuff, Cityscapes, folder, toy): shorter side resized to ``resolution``, then a
  ``resolution x resolution`` center crop;
* ``"square"`` (Pascal VOC): resized to ``(resolution, resolution)``.

Images and labels get the same geometry, so each label pixel stays aligned with its image pixel. Images become float
tensors in [0, 1] normalised with the backbone's mean / std; labels become int64 tensors with -1 = ignore.
"""

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from models.normalisation import IMAGENET_MEAN, IMAGENET_STD

RESIZE_MODES = ("center", "square")


def resize_pil(image: Image.Image, resolution: int, mode: str) -> Image.Image:
    """Resize (nearest) and crop one PIL image to ``resolution x resolution``."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    image = TF.resize(image, resolution if mode == "center" else [resolution, resolution], InterpolationMode.NEAREST)
    return TF.center_crop(image, [resolution, resolution]) if mode == "center" else image


def normalize(img: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """img: [..., 3, H, W] in [0, 1] -> [..., 3, H, W], (img - mean) / std per channel."""
    mean, std = (torch.as_tensor(v, dtype=img.dtype, device=img.device).view(-1, 1, 1) for v in (mean, std))
    return (img - mean) / std


def image_to_tensor(image: Image.Image, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image [H, W] -> normalised float32 tensor [3, H, W]."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8, copy=True))
    return normalize(pixels.permute(2, 0, 1).to(torch.float32).div(255), mean, std)


class SegmentationTransform:
    """(PIL image, int64 label array or None) -> (img [3, res, res], label [res, res]).

    The label comes decoded (class ids, -1 = ignore); a missing label becomes all -1. Nearest interpolation moves
    values without mixing them, so decoding before or after the resize gives the same result.
    """

    def __init__(self, resolution: int, mode: str = "center", mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
        if int(resolution) <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution}")
        self.resolution, self.mode = int(resolution), mode
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image: Image.Image, label: np.ndarray | None):
        img = image_to_tensor(resize_pil(image, self.resolution, self.mode), self.mean, self.std)
        if label is None:
            return img, torch.full((self.resolution, self.resolution), -1, dtype=torch.int64)
        # int32 PIL images ("I" mode) resize with nearest like any other mode
        label_image = resize_pil(Image.fromarray(np.asarray(label, dtype=np.int32)), self.resolution, self.mode)
        return img, torch.from_numpy(np.array(label_image, dtype=np.int64))

    def __repr__(self):
        fields = f"resolution={self.resolution}, mode={self.mode!r}, mean={self.mean}, std={self.std}"
        return f"{type(self).__name__}({fields})"
