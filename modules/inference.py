"""Inference: flip test-time augmentation (SPEC §7) and whole pictures of any size.

The heads see fixed-size inputs (the TR head's queries are a fixed patch grid), so a picture is resized to a
short side of ``window`` pixels and covered by ``window x window`` windows, ``stride`` apart, the last one flush
with the far edge; the class scores of overlapping windows are averaged per pixel, then brought back to the
picture's own size.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.segment import tokens_to_image


@torch.no_grad()
def flip_tta_features(backbone, teacher_head, img):
    """SPEC §7: u = (h(T(x)) + flip(h(T(flip x)))) / 2 on the patch grid.

    img: [B, 3, H, W] normalised -> u: [B, r, h, w]. Also returns the plain tokens [B, N, D].
    """
    tokens = backbone(img)
    flipped = tokens_to_image(teacher_head(backbone(img.flip(dims=[3]))))
    return (tokens_to_image(teacher_head(tokens)) + flipped.flip(dims=[3])) / 2, tokens


def upsample(x, size):
    """Bilinear, align_corners=False: [B, C, h, w] -> [B, C, H, W]."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Offsets 0, stride, 2*stride, ..., length - window of the windows covering ``[0, length)``."""
    if length < window:
        raise ValueError(f"a side of {length} pixels is shorter than the window ({window})")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, {window}], got {stride}")
    return list(range(0, length - window, stride)) + [length - window]


def resize_short_side(img: Tensor, side: int) -> Tensor:
    """img: [B, 3, H, W] -> [B, 3, H', W'] with min(H', W') = side, aspect ratio kept (bilinear, antialiased)."""
    height, width = img.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    if size == (height, width):
        return img
    return F.interpolate(img, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


def sliding_window_scores(img: Tensor, window: int, stride: int, score_fn, batch_size: int) -> Tensor:
    """Per-pixel scores of a picture averaged over the windows that cover each pixel.

    img: [3, H, W] with min(H, W) >= window; score_fn: windows [n, 3, window, window] -> scores [n, C, window,
    window]; at most ``batch_size`` windows per call. Returns float32 [C, H, W] on img's device.
    """
    height, width = img.shape[-2:]
    corners = [(y, x) for y in window_starts(height, window, stride) for x in window_starts(width, window, stride)]
    total = None
    count = torch.zeros(height, width, device=img.device)
    for first in range(0, len(corners), batch_size):
        chunk = corners[first : first + batch_size]
        windows = torch.stack([img[:, y : y + window, x : x + window] for y, x in chunk])
        scores = score_fn(windows).float()
        if total is None:
            total = torch.zeros(scores.shape[1], height, width, device=img.device)
        for (y, x), score in zip(chunk, scores):
            total[:, y : y + window, x : x + window] += score
            count[y : y + window, x : x + window] += 1
    return total / count


def upsample_argmax(scores: Tensor, size: tuple[int, int], chunk: int = 8) -> Tensor:
    """Argmax of the bilinearly upsampled scores without holding all of them at full size.

    scores: [C, h, w] -> int64 [H, W]; classes are upsampled ``chunk`` at a time (a 12-MP picture costs
    ``chunk`` x 48 MB instead of C x 48 MB).
    """
    best_value, best_index = upsample(scores[None, :chunk], size)[0].max(dim=0)
    for first in range(chunk, scores.shape[0], chunk):
        value, index = upsample(scores[None, first : first + chunk], size)[0].max(dim=0)
        better = value > best_value
        best_value, best_index = torch.where(better, value, best_value), torch.where(better, index + first, best_index)
    return best_index


def crf_size(height: int, width: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) at which the CRF runs: the picture's own, or scaled down to <= max_pixels.

    Both sides shrink by the same factor, each to at least 1 pixel; when a very thin picture's short side
    stops at 1, its long side is cut to the budget instead.
    """
    if height * width <= max_pixels:
        return height, width
    scale = math.sqrt(max_pixels / (height * width))
    crf_height = max(1, int(height * scale))
    crf_width = max(1, min(int(width * scale), max_pixels // crf_height))
    return max(1, min(crf_height, max_pixels // crf_width)), crf_width
