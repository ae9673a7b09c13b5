"""Tensor operations of CAUSE: grid sampling, vector quantisation, modularity loss (SPEC §1–3)."""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

# Concept chunk budget of the modularity loss: elements of one [B, chunk, P, P] block.
_CHUNK_ELEMENTS = 1 << 24


def grid_side(num_tokens: int) -> int:
    """Side of the square token grid holding `num_tokens` tokens; ValueError if not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"expected tokens on a square grid, got N={num_tokens} tokens (not a perfect square)")
    return side


def grid_sample_tokens(
    x: torch.Tensor,
    order: Optional[torch.Tensor] = None,
    k: int = 4,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
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


class _MaxTanhComembership(torch.autograd.Function):
    """Δ_ij = max_k tanh(S_ik S_jk / τ) computed over concept chunks.

    S: [B, P, K] -> Δ: [B, P, P]. Forward keeps a running max and its arg-max concept, so
    no [B, K, P, P] tensor is ever stored; backward routes the gradient of each Δ_ij to
    its arg-max concept only, as `torch.max(dim)` does. Ties go to the lowest concept
    index (the first maximal value, `torch.max`'s documented choice); a NaN wins as in
    `torch.max`. The element-wise arithmetic is the literal formulation's, so Δ is
    bit-identical to it and gradients differ only by summation order.
    """

    @staticmethod
    def forward(ctx, assignment: torch.Tensor, temp: float, chunk_size: int) -> torch.Tensor:
        batch, tokens, concepts = assignment.shape
        by_concept = assignment.transpose(1, 2)
        delta = assignment.new_full((batch, tokens, tokens), -math.inf)
        argmax = torch.zeros((batch, tokens, tokens), dtype=torch.long, device=assignment.device)
        for start in range(0, concepts, chunk_size):
            chunk = by_concept[:, start:start + chunk_size]
            values, index = torch.tanh(chunk.unsqueeze(3) * chunk.unsqueeze(2) / temp).max(dim=1)
            better = (values > delta) | (values.isnan() & ~delta.isnan())
            delta = torch.where(better, values, delta)
            argmax = torch.where(better, index + start, argmax)
        ctx.save_for_backward(assignment, delta, argmax)
        ctx.temp = temp
        return delta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_delta: torch.Tensor):
        assignment, delta, argmax = ctx.saved_tensors
        # Same element-wise order as autograd through tanh then the division by τ.
        grad_product = grad_delta * (1 - delta * delta) / ctx.temp
        argmax_t = argmax.transpose(1, 2)
        s_i = assignment.gather(2, argmax)
        s_j = assignment.gather(2, argmax_t).transpose(1, 2)
        grad = torch.zeros_like(assignment)
        grad.scatter_add_(2, argmax, grad_product * s_j)
        grad.scatter_add_(2, argmax_t, (grad_product * s_i).transpose(1, 2))
        return grad, None, None


def modularity_matrix(feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Modularity matrix of the cosine affinity graph of every image (SPEC §3).

    feats: [B, P, D] -> (W [B, P, P], e [B, 1, 1]) with A = max(0, cos) off the diagonal,
    d = row sums, e = total, W = A − d dᵀ / e (written as the reference does).
    """
    normed = F.normalize(feats, dim=2)
    affinity = (normed @ normed.transpose(2, 1)).clamp(0)
    affinity = affinity - affinity * torch.eye(affinity.shape[1], dtype=affinity.dtype, device=affinity.device)
    degree = affinity.sum(dim=2, keepdim=True)
    edges = affinity.sum(dim=(1, 2), keepdim=True)
    return affinity - (degree / edges) @ (degree.transpose(2, 1) / edges) * edges, edges


def soft_comembership(
    concepts: torch.Tensor, feats: torch.Tensor, temp: float = 0.1, chunk_size: Optional[int] = None
) -> torch.Tensor:
    """Δ_ij = max_k tanh(S_ik S_jk / τ) with S = max(0, cos(feats, concepts)).

    concepts: [K, D], feats: [B, P, D] -> [B, P, P]; peak memory O(B·P²) plus one
    [B, chunk_size, P, P] block (default: as many concepts as fit in 2^24 elements).
    """
    batch, tokens, _ = feats.shape
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ELEMENTS // max(1, batch * tokens * tokens))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    assignment = (F.normalize(feats, dim=2) @ F.normalize(concepts, dim=1).t()).clamp(0)
    return _MaxTanhComembership.apply(assignment, temp, chunk_size)


def modularity_loss(
    concepts: torch.Tensor,
    feats: torch.Tensor,
    temp: float = 0.1,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """Negative mean modularity Q of the soft concept assignment (SPEC §3).

    concepts: [K, D], feats: [B, P, D] (already grid-sampled; detached here) -> scalar.
    Q_b = trace((W_b / e_b) Δ_b). Gradients flow only into `concepts`. Half-precision
    inputs and autocast are computed in float32 (float64 stays float64).
    """
    if concepts.dim() != 2 or feats.dim() != 3 or concepts.shape[1] != feats.shape[2]:
        raise ValueError(
            f"modularity_loss needs concepts [K, D] and feats [B, P, D] of the same D, got "
            f"{tuple(concepts.shape)} and {tuple(feats.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(concepts.dtype, feats.dtype), torch.float32)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        concepts = concepts.to(dtype)
        feats = feats.detach().to(dtype)
        weights, edges = modularity_matrix(feats)
        delta = soft_comembership(concepts, feats, temp, chunk_size)
        modularity = ((weights / edges) @ delta).diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        return -modularity.mean()
