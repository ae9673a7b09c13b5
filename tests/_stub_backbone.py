"""A tiny backbone stub for tests of flip TTA and evaluation: tokens of square patches."""

import torch
import torch.nn as nn

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PatchBackbone(nn.Module):
    """[B, 3, side·patch, side·patch] -> tokens [B, side², dim]: a linear map of each patch plus a
    term that depends on the column, so that the backbone is not flip-equivariant. Carries the
    ImageNet ``mean``/``std`` its inputs are normalised with, as the project's backbones do."""

    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, side: int, dim: int, patch: int = 4):
        super().__init__()
        self.side, self.patch = side, patch
        self.patch_size = patch  # as the project's backbones name it
        self.proj = nn.Linear(3 * patch * patch, dim)
        self.column = nn.Parameter(torch.randn(side, dim))

    def forward(self, img):
        p = self.patch
        patches = img.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5)  # [B, h, w, 3, p, p]
        tokens = self.proj(patches.reshape(img.shape[0], self.side, self.side, -1)) + self.column
        return tokens.reshape(img.shape[0], self.side * self.side, -1)
