"""Views of an image for self-supervised pre-training (``pretrain_toy.py``): random resized crops with flips,
quarter turns and colour jitter, the geometry that maps a view's points back to the image, the patch
correspondences between two views, and random patch masks."""

import math

import torch
from torchvision.transforms.v2 import functional as TF

from models.normalisation import IMAGENET_MEAN, IMAGENET_STD


def random_view(
    image: torch.Tensor, size: int, scale, jitter: float, rotate: bool, gen: torch.Generator, near=None
) -> tuple[torch.Tensor, tuple]:
    """A random resized crop, flip, quarter-turn and colour jitter of uint8 [3, H, W].

    near: a geometry whose crop box must hold this crop's centre (so that the two overlap).
    Returns (normalised float [3, size, size], geometry (top, left, h, w, flipped, quarter turns)).
    """
    height, width = image.shape[-2:]
    u = torch.rand(7, generator=gen).tolist()
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * u[1])
    h = min(height, round(math.sqrt(area / ratio)))
    w = min(width, round(math.sqrt(area * ratio)))
    if near is None:
        top, left = int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1))
    else:
        top = min(max(0, round(near[0] + u[2] * near[2] - h / 2)), height - h)
        left = min(max(0, round(near[1] + u[3] * near[3] - w / 2)), width - w)
    flipped, turns = u[4] < 0.5, int(u[5] * 4) if rotate else 0
    view = TF.resized_crop(image.float() / 255, top, left, h, w, [size, size], antialias=True)
    if flipped:
        view = view.flip(-1)
    view = torch.rot90(view, turns, dims=(-2, -1))
    brightness, contrast, saturation = (1 + jitter * (2 * torch.rand(3, generator=gen) - 1)).tolist()
    view = view * brightness
    view = (view - view.mean()) * contrast + view.mean()
    gray = (view * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
    view = ((view - gray) * saturation + gray).clamp(0, 1)
    return TF.normalize(view, IMAGENET_MEAN, IMAGENET_STD), (top, left, h, w, flipped, turns)


def view_to_image(geometry, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Points of a view (fractions of its side, [M] each) -> image pixel coordinates."""
    top, left, h, w, flipped, turns = geometry
    for _ in range(turns):  # rot90 turns counter-clockwise: view (y, x) shows (x, 1 - y) of the unturned crop
        y, x = x, 1 - y
    if flipped:
        x = 1 - x
    return top + y * h, left + x * w


def image_to_view(geometry, y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``view_to_image``."""
    top, left, h, w, flipped, turns = geometry
    y, x = (y - top) / h, (x - left) / w
    if flipped:
        x = 1 - x
    for _ in range(turns):
        y, x = 1 - x, y
    return y, x


def correspondences(source, target, grid: int) -> torch.Tensor:
    """For each patch of view ``source`` (row-major), the patch of view ``target`` holding its centre,
    or -1 where the target does not show it: long [grid * grid]."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    y, x = image_to_view(target, *view_to_image(source, y.reshape(-1), x.reshape(-1)))
    inside = (y >= 0) & (y < 1) & (x >= 0) & (x < 1)
    index = (y * grid).floor().long().clamp(0, grid - 1) * grid + (x * grid).floor().long().clamp(0, grid - 1)
    return torch.where(inside, index, torch.full_like(index, -1))


def patch_masks(n: int, grid: int, ratio, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Random patch masks of ``n`` crops: bool [n, grid * grid]; a crop is masked with probability ``prob``."""
    fraction = ratio[0] + (ratio[1] - ratio[0]) * torch.rand(n, generator=gen)
    fraction = torch.where(torch.rand(n, generator=gen) < prob, fraction, torch.zeros(n))
    count = (fraction * grid * grid).round().long()
    ranks = torch.rand(n, grid * grid, generator=gen).argsort(1).argsort(1)
    return ranks < count[:, None]
