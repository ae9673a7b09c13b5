"""Tensor operations of CAUSE: grid sampling and vector quantisation (SPEC §1-2)."""

import math

import torch
import torch.nn.functional as F


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid holding `num_tokens` tokens; ValueError if not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"expected tokens on a square grid, got N={num_tokens} tokens (not a perfect square)")
    return side


def grid_sample_tokens(
    x: torch.Tensor, order: torch.Tensor | None = None, k: int = 4, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per non-overlapping k×k cell of the square token grid (SPEC §1).

    x: [B, N, D] with N = h·h, row-major -> ([B, P, D], order [B·P]) with P = ⌊h/k⌋².
    Rows/columns that do not fill a whole cell are dropped. `order` holds one pick per
    (image, cell), image-major then cell row-major; a pick o ∈ [0, k²) is row-major inside
    its cell. When `order` is None it is drawn as `torch.randint(k*k, (B*P,), generator=...)`
    on the generator's device (the CPU default generator when None), which is the draw the
    reference makes; pass the returned `order` to sample another tensor of the same grid
    at the same positions.
    """
    if x.dim() != 3:
        raise ValueError(f"grid_sample_tokens expects tokens [B, N, D], got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"grid cell size k must be >= 1, got {k}")
    batch, num_tokens, _ = x.shape
    side = grid_side(num_tokens)
    cells_per_side = side // k
    if cells_per_side == 0:
        raise ValueError(f"a {side}x{side} token grid has no whole {k}x{k} cell")
    num_cells = cells_per_side * cells_per_side

    if order is None:
        device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randint(k * k, (batch * num_cells,), generator=generator, device=device)
    elif order.shape != (batch * num_cells,) or order.dtype != torch.long:
        raise ValueError(
            f"order must be a LongTensor of shape ({batch * num_cells},) for B={batch} and "
            f"{num_cells} cells, got {order.dtype} of shape {tuple(order.shape)}"
        )

    picks = order.to(x.device).view(batch, num_cells)
    cell = torch.arange(num_cells, device=x.device)
    row = (cell // cells_per_side) * k + picks // k
    col = (cell % cells_per_side) * k + picks % k
    token = row * side + col
    sampled = torch.gather(x, 1, token.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return sampled, order


def cosine_similarity_matrix(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token to every codebook row.

    x: [..., D], codebook: [K, D] -> [..., K]
    """
    flat = F.normalize(x.reshape(-1, x.shape[-1]), dim=1)
    return (flat @ F.normalize(codebook, dim=1).t()).view(*x.shape[:-1], codebook.shape[0])


def vq_index(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the most cosine-similar codebook row (SPEC §2).

    x: [B, N, D], codebook: [K, D] -> LongTensor [B, N]
    """
    if x.shape[-1] != codebook.shape[-1] or codebook.dim() != 2:
        raise ValueError(
            f"vq needs tokens [..., D] and a codebook [K, D] of the same D, got "
            f"{tuple(x.shape)} and {tuple(codebook.shape)}"
        )
    return cosine_similarity_matrix(x, codebook).argmax(dim=-1)


def vq(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Replace every token by its codebook row, raw (not normalised) (SPEC §2).

    x: [B, N, D], codebook: [K, D] -> [B, N, D]
    """
    return codebook[vq_index(x, codebook)]
