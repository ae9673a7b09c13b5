"""Position embeddings of the ViT families, each resized to a new patch grid as its official code does.

`interpolate_position_embedding` maps the patch part of a position table, [1, M*M, D] for the
checkpoint's M x M grid, to the target h x w grid, [1, h*w, D], row-major. The rules differ in ways
that change the features (an offset in the scale factor, antialiasing, one factor for both axes,
regeneration instead of resampling), so each family keeps its own.
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def interpolate_offset(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINO, iBOT, MAE (as CAUSE uses it), DINOv2 without registers: [1, D, M, M] -> [1, D, h, w].

    Bicubic, no antialias, scale factors ((h + 0.1) / M, (w + 0.1) / M): the 0.1 offset
    moves the sampling positions, so `size=(h, w)` would not give the same table.
    """
    side = grid.shape[-1]
    return F.interpolate(grid, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic")


def interpolate_msn(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """MSN: bicubic, no offset, one factor sqrt(h*w / M^2) for square grids: [1, D, M, M] -> [1, D, h, w].

    Non-square grids (which the official code does not support) use h/M and w/M per axis.
    The output size is forced to (h, w): for some sizes (e.g. M = 14, h = w = 29) the
    official factor floors to h - 1 and its code fails; the sampling positions stay those
    of the official factor, which equal those of `size=(h, w)` up to the rounding of the factor.
    """
    side = grid.shape[-1]
    if h == w:
        scale_h = scale_w = math.sqrt(h * w / side**2)
    else:
        scale_h, scale_w = h / side, w / side
    return torch.ops.aten.upsample_bicubic2d.default(grid, [h, w], False, scale_h, scale_w)


def interpolate_antialias(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """DINOv2 with registers: bicubic to size (h, w) with antialias. [1, D, M, M] -> [1, D, h, w]"""
    return F.interpolate(grid, size=(h, w), mode="bicubic", antialias=True)


def interpolate_size(grid: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Unicom (our rule; its forward has no resize): bicubic to size (h, w), no antialias.
    [1, D, M, M] -> [1, D, h, w]"""
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)


GRID_RULES: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
    "offset": interpolate_offset,
    "msn": interpolate_msn,
    "antialias": interpolate_antialias,
    "size": interpolate_size,
}


def sincos_2d_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """MoCo v3's fixed 2-D sin-cos table for an h x w grid, without the CLS slot: -> [1, h*w, dim].

    Keeps the official `meshgrid(grid_w, grid_h)` ("ij") order: flat token m gets the pair
    (m // h, m % h), and the channels are [sin(w), cos(w), sin(h), cos(h)], D/4 each (with
    row-major tokens of a square grid, the "w" quarter therefore encodes the row).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs a width divisible by 4, got {dim}")
    grid_w, grid_h = torch.meshgrid(
        torch.arange(w, dtype=torch.float32), torch.arange(h, dtype=torch.float32), indexing="ij"
    )
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    return torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]


def position_rule(family: str, num_registers: int) -> str:
    """Name of the family's position-embedding rule: a key of `GRID_RULES`, or "sincos" (MoCo v3)."""
    if family == "dinov2":
        return "antialias" if num_registers else "offset"
    return {"msn": "msn", "mocov3": "sincos", "unicom": "size"}.get(family, "offset")


def interpolate_position_embedding(table: torch.Tensor, h: int, w: int, rule: str) -> torch.Tensor:
    """Patch position table of the native M x M grid for an h x w grid by `rule`, none at the native grid.

    table: [1, M*M, D] -> [1, h*w, D]
    """
    side, dim = math.isqrt(table.shape[1]), table.shape[2]
    if (h, w) == (side, side):
        return table
    if rule == "sincos":  # MoCo v3: the table is not resampled but regenerated for the h x w grid
        return sincos_2d_position_embedding(h, w, dim).to(table)
    grid = GRID_RULES[rule](table.reshape(1, side, side, dim).permute(0, 3, 1, 2), h, w)
    return grid.permute(0, 2, 3, 1).flatten(1, 2)
