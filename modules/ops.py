"""Tensor operations of CAUSE: grid sampling and vector quantisation (SPEC §1-2)."""

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid holding `num_tokens` tokens; ValueError if not square."""
    if (side := math.isqrt(num_tokens)) ** 2 != num_tokens:
        raise ValueError(f"expected tokens on a square grid, got N={num_tokens} tokens (not a perfect square)")
    return side


def grid_sample_tokens(
    x: Tensor, order: Tensor | None = None, k: int = 4, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick one token per non-overlapping k×k cell of the square token grid (SPEC §1).

    x: [B, N, D] with N = h·h, row-major -> ([B, P, D], order [B·P]) with P = ⌊h/k⌋². Rows/columns that do not
    fill a whole cell are dropped. `order` holds one pick per (image, cell), image-major then cell row-major; a
    pick o ∈ [0, k²) is row-major inside its cell. When `order` is None it is drawn as
    `torch.randint(k*k, (B*P,), generator=...)` on the generator's device (the CPU default generator when
    None), which is the draw the reference makes; pass the returned `order` to sample another tensor of the
    same grid at the same positions.
    """
    if x.dim() != 3:
        raise ValueError(f"grid_sample_tokens expects tokens [B, N, D], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"grid cell size k must be >= 1, got {k}")
    batch, side = x.shape[0], grid_side(x.shape[1])
    if (per_side := side // k) == 0:
        raise ValueError(f"a {side}x{side} token grid has no whole {k}x{k} cell")
    cells = per_side * per_side
    if order is None:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randint(k * k, (batch * cells,), generator=generator, device=device)
    elif order.shape != (batch * cells,) or order.dtype != torch.long:
        msg = f"order must be a LongTensor of shape ({batch * cells},) for B={batch} and {cells} cells, got"
        raise ValueError(f"{msg} {order.dtype} of shape {tuple(order.shape)}")
    picks = order.to(x.device).view(batch, cells)
    cell = torch.arange(cells, device=x.device)
    token = ((cell // per_side) * k + picks // k) * side + (cell % per_side) * k + picks % k
    return torch.gather(x, 1, token.unsqueeze(-1).expand(-1, -1, x.shape[-1])), order


def cosine_similarity_matrix(x: Tensor, codebook: Tensor) -> Tensor:
    """Cosine similarity of every token to every codebook row: x [..., D], codebook [K, D] -> [..., K]."""
    flat = F.normalize(x.reshape(-1, x.shape[-1]), dim=1)
    return (flat @ F.normalize(codebook, dim=1).t()).view(*x.shape[:-1], codebook.shape[0])


def vq_index(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the most cosine-similar codebook row (SPEC §2): x [B, N, D], codebook [K, D] -> LongTensor [B, N]."""
    if x.shape[-1] != codebook.shape[-1] or codebook.dim() != 2:
        msg = "vq needs tokens [..., D] and a codebook [K, D] of the same D, got"
        raise ValueError(f"{msg} {tuple(x.shape)} and {tuple(codebook.shape)}")
    return cosine_similarity_matrix(x, codebook).argmax(dim=-1)


def vq(x: Tensor, codebook: Tensor) -> Tensor:
    """Every token replaced by its codebook row, raw (not normalised) (SPEC §2): [B, N, D], [K, D] -> [B, N, D]."""
    return codebook[vq_index(x, codebook)]
