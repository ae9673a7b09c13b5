"""The objectives of CAUSE and one training step of each stage (SPEC §3-6).

``modularity_loss`` (stages 1, 3) and the front door's concept-wise contrastive loss (``front_door_loss``,
stage 2) sit next to the stage steps that call them; nothing here knows about optimisers, logging or distribution.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.ops import grid_sample_tokens, vq_index
from modules.segment import linear_probe_loss, tokens_to_image

# Concept chunk budget of the modularity loss: elements of one [B, chunk, P, P] block.
_MODULARITY_CHUNK = 1 << 24


# -- modularity (SPEC §3) ----------------------------------------------------------------------


class _MaxTanhComembership(torch.autograd.Function):
    """Δ_ij = max_k tanh(S_ik S_jk / τ) computed over concept chunks.

    S: [B, P, K] -> Δ: [B, P, P]. Forward keeps a running max and its arg-max concept, so no [B, K, P, P]
    tensor is ever stored; backward routes the gradient of each Δ_ij to its arg-max concept only, as
    `torch.max(dim)` does (ties go to the lowest concept index; a NaN wins). The element-wise arithmetic is
    the literal formulation's, so Δ is bit-identical to it and gradients differ only by summation order.
    """

    @staticmethod
    def forward(ctx, assignment: Tensor, temp: float, chunk_size: int) -> Tensor:
        batch, tokens, concepts = assignment.shape
        delta = assignment.new_full((batch, tokens, tokens), -math.inf)
        argmax = torch.zeros((batch, tokens, tokens), dtype=torch.long, device=assignment.device)
        for start in range(0, concepts, chunk_size):
            chunk = assignment[:, :, start : start + chunk_size].transpose(1, 2)
            values, index = torch.tanh(chunk.unsqueeze(3) * chunk.unsqueeze(2) / temp).max(dim=1)
            better = (values > delta) | (values.isnan() & ~delta.isnan())
            delta = torch.where(better, values, delta)
            argmax = torch.where(better, index + start, argmax)
        ctx.save_for_backward(assignment, delta, argmax)
        ctx.temp = temp
        return delta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_delta: Tensor):
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


def modularity_matrix(feats: Tensor) -> tuple[Tensor, Tensor]:
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


def soft_comembership(concepts: Tensor, feats: Tensor, temp: float = 0.1, chunk_size: int | None = None) -> Tensor:
    """Δ_ij = max_k tanh(S_ik S_jk / τ) with S = max(0, cos(feats, concepts)).

    concepts: [K, D], feats: [B, P, D] -> [B, P, P]; peak memory O(B·P²) plus one [B, chunk_size, P, P]
    block (default: as many concepts as fit in 2^24 elements).
    """
    if chunk_size is None:
        chunk_size = max(1, _MODULARITY_CHUNK // max(1, feats.shape[0] * feats.shape[1] ** 2))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    assignment = (F.normalize(feats, dim=2) @ F.normalize(concepts, dim=1).t()).clamp(0)
    return _MaxTanhComembership.apply(assignment, temp, chunk_size)


def modularity_loss(concepts: Tensor, feats: Tensor, temp: float = 0.1, chunk_size: int | None = None) -> Tensor:
    """Negative mean modularity Q of the soft concept assignment (SPEC §3).

    concepts: [K, D], feats: [B, P, D] (already grid-sampled; detached here) -> scalar. Q_b = trace((W_b / e_b) Δ_b).
    Gradients flow only into `concepts`. Half precision and autocast run in float32 (float64 stays float64).
    """
    if concepts.dim() != 2 or feats.dim() != 3 or concepts.shape[1] != feats.shape[2]:
        msg = "modularity_loss needs concepts [K, D] and feats [B, P, D] of the same D, got"
        raise ValueError(f"{msg} {tuple(concepts.shape)} and {tuple(feats.shape)}")
    dtype = torch.promote_types(torch.promote_types(concepts.dtype, feats.dtype), torch.float32)
    with torch.autocast(device_type=feats.device.type, enabled=False):
        concepts = concepts.to(dtype)
        feats = feats.detach().to(dtype)
        weights, edges = modularity_matrix(feats)
        delta = soft_comembership(concepts, feats, temp, chunk_size)
        modularity = ((weights / edges) @ delta).diagonal(dim1=-2, dim2=-1).sum(dim=-1)
        return -modularity.mean()


# -- concept-wise contrastive loss (SPEC §5) --------------------------------------------------

# Budget of one logits block: anchor rows × keys (512 MiB in float32). Blocks of many anchor
# rows keep the two similarity matmuls efficient: at the published bank, 2^24 (81 rows a block)
# took 1.8x the time of one full-size matmul pair, 2^27 (655 rows) 1.25x.
_CHUNK_ELEMENTS = 1 << 27


def _row_statistics(
    student, keys, key_cols, anchor_rows, pos_table, neg_table, self_excluded, temp, chunk_rows, need_grad
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Every anchor row against one key set, one block of `chunk_rows` anchor rows at a time.

    student: [A, E] normalised anchors; keys: [S, E] raw teacher vectors (normalised through their inverse
    norms, never copied); key_cols: [S] column of each key in the class tables (the last column is an empty
    bank slot: never positive nor counted); anchor_rows: [A] row of each anchor in the tables; pos_table,
    neg_table: bool [U, K+1] (code similarity > pos, < neg); self_excluded: key j is anchor j itself (the
    batch set). -> (n [A] positive pairs per row, row_loss [A] = Σ_j∈pos ℓ_ij, grad [A, E] or None:
    d row_loss / d student · temp).

    With s_ij the logits and m_i the row max, Σ_j∈pos ℓ_ij = n_i·(m_i + log Σ_counted e^(s_ij − m_i)) −
    Σ_j∈pos s_ij; the last sum is student_i·Σ_j∈pos k̂_j / temp, so only the counted mask is gathered per
    pair, and the positives come from per-concept key sums.
    """
    counted_table = pos_table | neg_table
    inv_norm = keys.norm(dim=1).clamp(min=1e-12).reciprocal()
    columns = counted_table.shape[1]
    # Σ of the normalised keys of each concept: one sparse [K+1, S] × [S, E] product, which reads the keys
    # once and copies none of them. Its indices are valid by construction, so torch's check is skipped.
    index = torch.stack([key_cols, torch.arange(keys.shape[0], device=keys.device)])
    membership = torch.sparse_coo_tensor(index, inv_norm, (columns, keys.shape[0]), check_invariants=False)
    key_sums = torch.sparse.mm(membership, keys)
    key_counts = torch.bincount(key_cols, minlength=columns).to(student.dtype)
    positive_rows = pos_table[anchor_rows].to(student.dtype)
    n = positive_rows @ key_counts
    positive_sums = positive_rows @ key_sums
    if self_excluded:
        self_positive = pos_table[anchor_rows, key_cols].to(student.dtype)
        self_counted = neg_table[anchor_rows, key_cols]
        n = n - self_positive
        positive_sums = positive_sums - self_positive[:, None] * keys * inv_norm[:, None]
    row_loss = student.new_empty(student.shape[0])
    grad = student.new_empty(student.shape) if need_grad else None
    scale = inv_norm / temp
    for start in range(0, student.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        weights = (student[rows] @ keys.t()).mul_(scale)
        row_max = weights.max(dim=1, keepdim=True).values
        weights.sub_(row_max).exp_()
        counted = counted_table[anchor_rows[rows]].index_select(1, key_cols)
        if self_excluded:
            diagonal = torch.arange(counted.shape[0], device=counted.device)
            counted[diagonal, diagonal + start] = self_counted[rows]
        weights.mul_(counted)
        denominator = weights.sum(dim=1)
        # A row with nothing counted has no positive either (n = 0); keep its log finite.
        log_denominator = torch.where(denominator > 0, denominator, torch.ones_like(denominator)).log()
        positive_logits = (student[rows] * positive_sums[rows]).sum(dim=1) / temp
        row_loss[rows] = n[rows] * (row_max[:, 0] + log_denominator) - positive_logits
        if need_grad:
            softmax_keys = weights.mul_(inv_norm) @ keys
            ratio = torch.where(denominator > 0, n[rows] / denominator, torch.zeros_like(denominator))
            grad[rows] = ratio[:, None] * softmax_keys - positive_sums[rows]
    return n, row_loss, grad


class _ContrastiveLoss(torch.autograd.Function):
    """L_front of normalised anchors [A, E]; the gradient is formed in the forward pass.

    The forward pass already holds every softmax weight, so it also forms the gradient with the one extra
    matmul the backward needs, instead of keeping or recomputing the [A, S] weights. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, student, key_sets, anchor_rows, pos_table, neg_table, batch, temp, chunk_elements):
        need_grad = ctx.needs_input_grad[0]
        tokens = student.shape[0] // batch
        counts, numerators, grads = [], [], []
        for keys, cols, excluded in key_sets:
            chunk_rows = max(1, chunk_elements // max(1, keys.shape[0]))
            n, row_loss, grad = _row_statistics(
                student, keys, cols, anchor_rows, pos_table, neg_table, excluded, temp, chunk_rows, need_grad
            )
            counts.append(n.view(batch, tokens).sum(dim=1))
            numerators.append(row_loss.view(batch, tokens).sum(dim=1))
            grads.append(grad)
        pairs = torch.stack(counts)
        present = pairs > 0
        # weight of each (key set, image) term: 1 / (its pairs · number of terms present)
        weight = torch.where(present, 1.0 / (pairs.clamp(min=1) * max(1, int(present.sum()))), torch.zeros_like(pairs))
        loss = (torch.stack(numerators) * weight).sum()
        if need_grad:
            grad = sum(g.view(batch, tokens, -1) * w[:, None, None] for g, w in zip(grads, weight))
            ctx.save_for_backward(grad.reshape(student.shape) / temp)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss,) + (None,) * 7


def front_door_loss(
    feat, proj, proj_ema, codebook, bank_feats, bank_idx, temp=0.07, pos=0.3, neg=0.1, chunk_elements=None
) -> Tensor:
    """Concept-wise contrastive loss L_front with the concept bank (SPEC §5).

    feat: [B, P, D] sampled backbone tokens, proj: [B, P, E] student projections, proj_ema: [B, P, E] teacher
    projections, codebook: [K, D], bank_feats: [S, E] raw bank vectors, bank_idx: LongTensor [S] their concepts
    (S may be 0; a negative index marks an empty slot, which takes no part, as `ConceptBank.slots` returns)
    -> scalar. One term per anchor image against the batch (self excluded) and, with a non-empty bank, one
    against the bank; the result is the mean of the terms that have a positive pair (a term without one is
    skipped; with none at all the result is a zero connected to `proj`). Gradients reach `proj` only.
    Computed in float32 (float64 stays float64).

    All B·P anchors are processed together, in blocks of at most `chunk_elements` anchor-key pairs (default
    2^27); positives and negatives are read from the codebook-similarity table of the batch's concepts,
    looked up once per step.
    """
    batch, tokens, _ = proj.shape
    if feat.shape[:2] != proj.shape[:2] or proj_ema.shape != proj.shape:
        msg = "front_door_loss needs feat [B, P, D] and proj, proj_ema [B, P, E] of matching B, P, E, got"
        raise ValueError(f"{msg} {tuple(feat.shape)}, {tuple(proj.shape)}, {tuple(proj_ema.shape)}")
    if bank_feats.dim() != 2 or bank_feats.shape[1] != proj.shape[2] or bank_idx.shape != bank_feats.shape[:1]:
        msg = f"the bank must be feats [S, {proj.shape[2]}] with concept indices [S], got"
        raise ValueError(f"{msg} {tuple(bank_feats.shape)} and {tuple(bank_idx.shape)}")
    if chunk_elements is not None and chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    dtype = torch.promote_types(proj.dtype, torch.float32)
    with torch.autocast(device_type=proj.device.type, enabled=False):
        codebook = codebook.detach().to(dtype)
        num_concepts = codebook.shape[0]
        codes = vq_index(feat.detach().to(dtype), codebook).reshape(-1)
        present, anchor_rows = torch.unique(codes, return_inverse=True)
        normed = F.normalize(codebook, dim=1)
        # The last column is the empty bank slot: NaN, so neither positive nor negative.
        code_sim = F.pad(normed[present] @ normed.t(), (0, 1), value=math.nan)
        student = F.normalize(proj.to(dtype), dim=2).reshape(batch * tokens, -1)
        key_sets = [(proj_ema.detach().to(dtype).reshape(batch * tokens, -1), codes, True)]
        if bank_feats.shape[0]:
            bank_idx = bank_idx.to(proj.device)
            if (top := int(bank_idx.max())) >= num_concepts:
                raise ValueError(f"bank concept indices must be < {num_concepts} (the codebook size), got {top}")
            bank_cols = torch.where(bank_idx < 0, num_concepts, bank_idx)
            key_sets.append((bank_feats.detach().to(device=proj.device, dtype=dtype), bank_cols, False))
        chunk = chunk_elements or _CHUNK_ELEMENTS
        return _ContrastiveLoss.apply(
            student, key_sets, anchor_rows, code_sim > pos, code_sim < neg, batch, temp, chunk
        )


def probe_loss(segment, teacher_feats, label, n_classes, detach=True):
    """Linear probe on teacher features [B, N, r] -> ``{"loss_linear", "probe_acc", "n_counted"}``.

    ``probe_acc``: percent of the counted pixels (0 <= label < C) it classifies right.
    ``detach=True`` keeps the labels out of the features (SPEC §5 step 4, stage 3 label-free);
    ``detach=False`` lets the probe's gradient reach the teacher head (stage 3 as the reference).
    """
    logits = tokens_to_image(segment.linear(teacher_feats.detach() if detach else teacher_feats))
    loss, n_correct, n_counted = linear_probe_loss(logits, label, n_classes)
    accuracy = 100.0 * float(n_correct) / max(1, int(n_counted))
    return {"loss_linear": loss, "probe_acc": accuracy, "n_counted": int(n_counted)}


def mediator_loss(codebook, tokens, grid=True, generator=None, temp=0.1):
    """Stage 1: codebook [K, D], backbone tokens [B, N, D] -> modularity loss (SPEC §4)."""
    if grid:
        tokens, _ = grid_sample_tokens(tokens, generator=generator)
    return modularity_loss(codebook, tokens.detach(), temp=temp)


def front_door_step(
    segment, tokens, label, codebook, bank, n_classes, grid=True, generator=None, temp=0.07, pos=0.3, neg=0.1
):
    """Stage 2 losses for one batch (SPEC §5 "One training step", steps 2-4).

    segment: a SegmentMLP or SegmentTR (its ``contrastive_views`` says where the grid sampling happens);
    tokens: [B, N, D] frozen backbone tokens; label: [B, H, W]; codebook: [K, D]; bank: a ConceptBank, or
    None for the loss without the bank term. Returns a dict with ``loss``, ``loss_front`` and
    :func:`probe_loss`'s values, and what the bank update needs afterwards: ``sampled_tokens`` [B, P, D]
    and ``teacher_proj`` [B, P, E].
    """

    def sample(x, order=None):
        return grid_sample_tokens(x, order=order, generator=generator) if grid else (x, None)

    teacher_feats, sampled, proj, proj_ema = segment.contrastive_views(tokens, sample)
    no_bank = proj.new_zeros(0, proj.shape[-1]), torch.zeros(0, dtype=torch.long, device=proj.device)
    bank_keys = no_bank if bank is None else bank.loss_keys()
    loss_front = front_door_loss(sampled, proj, proj_ema.detach(), codebook, *bank_keys, temp=temp, pos=pos, neg=neg)
    probe = probe_loss(segment, teacher_feats, label, n_classes)
    losses = {"loss": loss_front + probe["loss_linear"], "loss_front": loss_front, **probe}
    return losses | {"sampled_tokens": sampled.detach(), "teacher_proj": proj_ema.detach()}


def update_bank(bank, codebook, sampled_tokens, teacher_proj, generator=None):
    """SPEC §5 step 6: store teacher projections [B, P, E] under their tokens' concepts."""
    concept_idx = vq_index(sampled_tokens, codebook).reshape(-1)
    bank.update(concept_idx, teacher_proj.reshape(-1, teacher_proj.shape[-1]), generator=generator)


def fine_tuning_step(
    segment, cluster_probe, tokens, label, n_classes, grid=True, generator=None, reference=True, temp=0.1
):
    """Stage 3 losses (SPEC §6): modularity of the teacher features against the cluster probe.

    cluster_probe: [C, r]; tokens: [B, N, D]. The teacher head runs in train mode (dropout on).
    The modularity loss detaches the features, so it trains ``cluster_probe`` only.
    ``reference=True``: the supervised probe reads the teacher features undetached, so its
    cross-entropy trains the teacher head, as the published CAUSE; ``False``: label-free, the
    probe reads detached features and the teacher head gets no gradient.
    """
    teacher_feats = segment.head_ema(tokens)
    feats = grid_sample_tokens(teacher_feats, generator=generator)[0] if grid else teacher_feats
    loss_mod = modularity_loss(cluster_probe, feats, temp=temp)
    probe = probe_loss(segment, teacher_feats, label, n_classes, detach=not reference)
    return {"loss": loss_mod + probe["loss_linear"], "loss_mod": loss_mod, **probe}
