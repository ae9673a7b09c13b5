"""Concept bank and the concept-wise contrastive loss of the front-door stage (SPEC §5)."""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.ops import vq_index


class ConceptBank(nn.Module):
    """One FIFO of at most `capacity` raw teacher projections per concept (SPEC §5).

    Storage is a preallocated ring buffer [K, capacity, dim] with a fill count and a write
    pointer per concept, all non-persistent buffers: `.to(device)` / `.double()` move them,
    state dicts never contain them. The storage dtype is the module's (float32 unless the
    module is cast); incoming vectors are cast to it.
    """

    def __init__(self, num_concepts: int, dim: int, capacity: int = 100, keep_ratio: float = 0.5):
        super().__init__()
        if num_concepts < 1 or dim < 1 or capacity < 1:
            raise ValueError(
                f"ConceptBank needs num_concepts, dim, capacity >= 1, got {num_concepts}, {dim}, {capacity}"
            )
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must lie in [0, 1], got {keep_ratio}")
        self.num_concepts = num_concepts
        self.dim = dim
        self.capacity = capacity
        self.keep_ratio = keep_ratio
        # Zeros, not garbage: `slots` exposes the empty slots too (the loss ignores them, but
        # a NaN there would still reach the matmul).
        self.register_buffer("storage", torch.zeros(num_concepts, capacity, dim), persistent=False)
        self.register_buffer("counts", torch.zeros(num_concepts, dtype=torch.long), persistent=False)
        self.register_buffer("heads", torch.zeros(num_concepts, dtype=torch.long), persistent=False)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _random_subset(self, concept_idx: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        """Rows kept by one update: a uniformly random ⌊keep_ratio·n⌋ of the n rows of each concept.

        concept_idx: [M] -> LongTensor [L] of row indices, concept ascending, input order
        within a concept.
        """
        device = generator.device if generator is not None else concept_idx.device
        keys = torch.rand(concept_idx.shape[0], generator=generator, device=device).to(concept_idx.device)
        by_key = keys.argsort()
        ranked = by_key[concept_idx[by_key].argsort(stable=True)]
        seen = torch.bincount(concept_idx, minlength=self.num_concepts)
        first = seen.cumsum(0) - seen
        rank = torch.arange(ranked.shape[0], device=ranked.device) - first[concept_idx[ranked]]
        quota = torch.floor(seen.double() * self.keep_ratio).long()
        keep = torch.zeros_like(concept_idx, dtype=torch.bool)
        keep[ranked] = rank < quota[concept_idx[ranked]]
        kept = keep.nonzero().squeeze(1)
        return kept[concept_idx[kept].argsort(stable=True)]

    @torch.no_grad()
    def update(
        self, concept_idx: torch.Tensor, feats: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> None:
        """Append a random ⌊keep_ratio·n⌋ of each concept's n vectors, dropping the oldest.

        concept_idx: LongTensor [M] in [0, K), feats: [M, dim]. Kept vectors are appended in
        their input order; if more than `capacity` are appended to one concept at once, the
        last `capacity` of them survive.
        """
        if concept_idx.dim() != 1 or feats.shape != (concept_idx.shape[0], self.dim):
            raise ValueError(
                f"ConceptBank.update needs concept_idx [M] and feats [M, {self.dim}], got "
                f"{tuple(concept_idx.shape)} and {tuple(feats.shape)}"
            )
        if concept_idx.dtype != torch.long:
            raise ValueError(f"concept_idx must be a LongTensor, got {concept_idx.dtype}")
        concept_idx = concept_idx.to(self.counts.device)
        if concept_idx.numel() and not 0 <= int(concept_idx.min()) <= int(concept_idx.max()) < self.num_concepts:
            raise ValueError(f"concept indices must lie in [0, {self.num_concepts})")
        kept = self._random_subset(concept_idx, generator)
        concepts = concept_idx[kept]
        appended = torch.bincount(concepts, minlength=self.num_concepts)
        position = torch.arange(kept.shape[0], device=kept.device) - (appended.cumsum(0) - appended)[concepts]
        overflow = (appended - self.capacity).clamp(min=0)[concepts]
        survive = position >= overflow
        concepts = concepts[survive]
        slot = (self.heads[concepts] + position[survive] - overflow[survive]) % self.capacity
        rows = feats.detach().to(device=self.storage.device, dtype=self.storage.dtype)[kept[survive]]
        self.storage[concepts, slot] = rows
        self.heads.copy_((self.heads + appended.clamp(max=self.capacity)) % self.capacity)
        self.counts.copy_((self.counts + appended).clamp(max=self.capacity))

    def contents(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Every stored vector with its concept: concept ascending, oldest first within a concept.

        -> (feats [S, dim] raw, concept_idx LongTensor [S])
        """
        concepts, slot = self._filled()
        return self.storage[concepts, slot], concepts

    def _filled(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(concept [S], slot [S]) of every stored vector, concept ascending, oldest first."""
        concepts = torch.repeat_interleave(torch.arange(self.num_concepts, device=self.counts.device), self.counts)
        age = torch.arange(concepts.shape[0], device=concepts.device) - (self.counts.cumsum(0) - self.counts)[concepts]
        return concepts, (self.heads[concepts] - self.counts[concepts] + age) % self.capacity

    def state(self) -> dict:
        """What a resumed run needs to continue bit-identically: the stored vectors where they sit.

        -> {"feats": [S, dim], "concept_idx": [S], "slot": [S], "heads": [K]} on the CPU: only the
        S filled rows, each with its ring-buffer slot, so that a restored bank has the same layout
        (``slots()`` reads the storage in place, and the loss sums its keys in that order).
        The module's ``state_dict`` stays empty.
        """
        concepts, slot = self._filled()
        return {"feats": self.storage[concepts, slot].cpu(), "concept_idx": concepts.cpu(), "slot": slot.cpu(),
                "heads": self.heads.cpu()}

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        """Refill the bank from :meth:`state`: same vectors in the same slots, same write pointers."""
        concepts = state["concept_idx"].to(self.counts.device)
        slot = state["slot"].to(self.counts.device)
        feats = state["feats"]
        if concepts.dim() != 1 or slot.shape != concepts.shape or feats.shape != (concepts.shape[0], self.dim):
            raise ValueError(f"a bank state needs feats [S, {self.dim}], concept_idx [S] and slot [S], got "
                             f"{tuple(feats.shape)}, {tuple(concepts.shape)} and {tuple(slot.shape)}")
        if concepts.numel() and not 0 <= int(concepts.min()) <= int(concepts.max()) < self.num_concepts:
            raise ValueError(f"bank state concept indices must lie in [0, {self.num_concepts})")
        if slot.numel() and not 0 <= int(slot.min()) <= int(slot.max()) < self.capacity:
            raise ValueError(f"bank state slots must lie in [0, {self.capacity})")
        self.storage.zero_()
        self.storage[concepts, slot] = feats.to(device=self.storage.device, dtype=self.storage.dtype)
        self.counts.copy_(torch.bincount(concepts, minlength=self.num_concepts))
        self.heads.copy_(state["heads"].to(self.heads.device))

    def slots(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The storage itself, without a copy: every slot with its concept, -1 where empty.

        -> (feats [K·capacity, dim] raw, a view of the storage; concept_idx LongTensor
        [K·capacity], -1 for an empty slot). Same vectors as `contents` in storage order;
        `front_door_loss` takes it as the bank and gives the same loss as with `contents`.
        """
        filled = torch.arange(self.capacity, device=self.counts.device) < self.counts[:, None]
        concepts = torch.arange(self.num_concepts, device=self.counts.device)[:, None].expand_as(filled)
        return self.storage.view(-1, self.dim), torch.where(filled, concepts, -1).reshape(-1)

    def loss_keys(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The bank as `front_door_loss` reads it most cheaply: `slots` (no copy) once at least
        half full, the compact `contents` before (fewer keys to score)."""
        if 2 * len(self) >= self.num_concepts * self.capacity:
            return self.slots()
        return self.contents()


# Budget of one logits block: anchor rows × keys (64 MiB in float32).
_CHUNK_ELEMENTS = 1 << 24


def _row_statistics(
    student: torch.Tensor,
    keys: torch.Tensor,
    key_cols: torch.Tensor,
    anchor_rows: torch.Tensor,
    positive_table: torch.Tensor,
    negative_table: torch.Tensor,
    self_excluded: bool,
    temp: float,
    chunk_rows: int,
    need_grad: bool,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Every anchor row against one key set, one block of anchor rows at a time.

    student: [A, E] normalised anchors; keys: [S, E] raw teacher vectors (normalised here
    through their inverse norms, never copied); key_cols: [S] column of each key in the
    class tables (the last column is an empty bank slot: never positive nor counted);
    anchor_rows: [A] row of each anchor in the tables; positive_table, negative_table:
    bool [U, K+1] (code similarity > pos, < neg); self_excluded: key j is anchor j itself
    (the batch set).
    -> (n [A] positive pairs per row, row_loss [A] = Σ_j∈pos ℓ_ij, grad [A, E] or None:
    d row_loss / d student · temp).

    With s_ij the logits and m_i the row max, Σ_j∈pos ℓ_ij = n_i·(m_i + log Σ_counted
    e^(s_ij − m_i)) − Σ_j∈pos s_ij; the last sum is student_i·Σ_j∈pos k̂_j / temp, so only
    the counted mask is gathered per pair, and the positives come from per-concept key sums.
    """
    dtype = student.dtype
    counted_table = positive_table | negative_table
    inv_norm = keys.norm(dim=1).clamp(min=1e-12).reciprocal()
    columns = counted_table.shape[1]
    # Σ of the normalised keys of each concept: one sparse [K+1, S] × [S, E] product, which
    # reads the keys once and copies none of them.
    membership = torch.sparse_coo_tensor(torch.stack([key_cols, torch.arange(keys.shape[0], device=keys.device)]),
                                         inv_norm, (columns, keys.shape[0]), check_invariants=True)
    key_sums = torch.sparse.mm(membership, keys)
    key_counts = torch.bincount(key_cols, minlength=columns).to(dtype)
    positive_rows = positive_table[anchor_rows].to(dtype)
    n = positive_rows @ key_counts
    positive_sums = positive_rows @ key_sums
    if self_excluded:
        self_positive = positive_table[anchor_rows, key_cols].to(dtype)
        self_counted = negative_table[anchor_rows, key_cols]
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

    The forward pass already holds every softmax weight, so it also forms the gradient
    with the one extra matmul the backward needs, instead of keeping or recomputing the
    [A, S] weights. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, student, key_sets, anchor_rows, positive_table, negative_table, batch, temp, chunk_elements):
        need_grad = ctx.needs_input_grad[0]
        tokens = student.shape[0] // batch
        counts, numerators, grads = [], [], []
        for keys, key_cols, self_excluded in key_sets:
            chunk_rows = max(1, chunk_elements // max(1, keys.shape[0]))
            n, row_loss, grad = _row_statistics(student, keys, key_cols, anchor_rows, positive_table,
                                                negative_table, self_excluded, temp, chunk_rows, need_grad)
            counts.append(n.view(batch, tokens).sum(dim=1))
            numerators.append(row_loss.view(batch, tokens).sum(dim=1))
            grads.append(grad)
        pairs = torch.stack(counts)
        present = pairs > 0
        terms = int(present.sum())
        # weight of each (key set, image) term: 1 / (its pairs · number of terms present)
        weight = torch.where(present, 1.0 / (pairs.clamp(min=1) * max(1, terms)), torch.zeros_like(pairs))
        loss = (torch.stack(numerators) * weight).sum()
        if need_grad:
            grad = sum(g.view(batch, tokens, -1) * w[:, None, None] for g, w in zip(grads, weight))
            ctx.save_for_backward(grad.reshape(student.shape) / temp)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None


def front_door_loss(
    feat: torch.Tensor,
    proj: torch.Tensor,
    proj_ema: torch.Tensor,
    codebook: torch.Tensor,
    bank_feats: torch.Tensor,
    bank_idx: torch.Tensor,
    temp: float = 0.07,
    pos: float = 0.3,
    neg: float = 0.1,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """Concept-wise contrastive loss L_front with the concept bank (SPEC §5).

    feat: [B, P, D] sampled backbone tokens, proj: [B, P, E] student projections,
    proj_ema: [B, P, E] teacher projections, codebook: [K, D], bank_feats: [S, E] raw
    bank vectors, bank_idx: LongTensor [S] their concepts (S may be 0; a negative index
    marks an empty slot, which takes no part, as `ConceptBank.slots` returns) -> scalar.
    One term per anchor image against the batch (self excluded) and, with a non-empty
    bank, one against the bank; the result is the mean of the terms that have a positive
    pair (a term without one is skipped; with none at all the result is a zero connected
    to `proj`). Gradients reach `proj` only. Computed in float32 (float64 stays float64).

    All B·P anchors are processed together, in blocks of at most `chunk_elements`
    anchor-key pairs (default 2^24); positives and negatives are read from the
    codebook-similarity table of the batch's concepts, looked up once per step.
    """
    batch, tokens, _ = proj.shape
    if feat.shape[:2] != proj.shape[:2] or proj_ema.shape != proj.shape:
        raise ValueError(
            f"front_door_loss needs feat [B, P, D] and proj, proj_ema [B, P, E] of matching B, P, E, got "
            f"{tuple(feat.shape)}, {tuple(proj.shape)}, {tuple(proj_ema.shape)}"
        )
    if bank_feats.dim() != 2 or bank_feats.shape[1] != proj.shape[2] or bank_idx.shape != bank_feats.shape[:1]:
        raise ValueError(
            f"the bank must be feats [S, {proj.shape[2]}] with concept indices [S], got "
            f"{tuple(bank_feats.shape)} and {tuple(bank_idx.shape)}"
        )
    if chunk_elements is not None and chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    dtype = torch.promote_types(proj.dtype, torch.float32)
    with torch.autocast(device_type=proj.device.type, enabled=False):
        codebook = codebook.detach().to(dtype)
        num_concepts = codebook.shape[0]
        codes = vq_index(feat.detach().to(dtype), codebook).reshape(-1)
        present, anchor_rows = torch.unique(codes, return_inverse=True)
        normed_codebook = F.normalize(codebook, dim=1)
        code_sim = normed_codebook[present] @ normed_codebook.t()
        empty_slot = torch.zeros(code_sim.shape[0], 1, dtype=torch.bool, device=code_sim.device)
        positive_table = torch.cat([code_sim > pos, empty_slot], dim=1)
        negative_table = torch.cat([code_sim < neg, empty_slot], dim=1)

        student = F.normalize(proj.to(dtype), dim=2).reshape(batch * tokens, -1)
        key_sets = [(proj_ema.detach().to(dtype).reshape(batch * tokens, -1), codes, True)]
        if bank_feats.shape[0]:
            bank_idx = bank_idx.to(proj.device)
            if int(bank_idx.max()) >= num_concepts:
                raise ValueError(f"bank concept indices must be < {num_concepts} (the codebook size), "
                                 f"got {int(bank_idx.max())}")
            bank_cols = torch.where(bank_idx < 0, torch.full_like(bank_idx, num_concepts), bank_idx)
            key_sets.append((bank_feats.detach().to(device=proj.device, dtype=dtype), bank_cols, False))
        return _ContrastiveLoss.apply(student, key_sets, anchor_rows, positive_table, negative_table, batch, temp,
                                      chunk_elements or _CHUNK_ELEMENTS)
