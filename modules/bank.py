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
        # Only rows below `counts` are ever read, so the storage needs no initial values.
        self.register_buffer("storage", torch.empty(num_concepts, capacity, dim), persistent=False)
        self.register_buffer("counts", torch.zeros(num_concepts, dtype=torch.long), persistent=False)
        self.register_buffer("heads", torch.zeros(num_concepts, dtype=torch.long), persistent=False)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def reset(self) -> None:
        """Empty every FIFO."""
        self.counts.zero_()
        self.heads.zero_()

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
        concepts = torch.repeat_interleave(torch.arange(self.num_concepts, device=self.counts.device), self.counts)
        age = torch.arange(concepts.shape[0], device=concepts.device) - (self.counts.cumsum(0) - self.counts)[concepts]
        slot = (self.heads[concepts] - self.counts[concepts] + age) % self.capacity
        return self.storage[concepts, slot], concepts

    def state(self) -> dict:
        """What a resumed run needs to continue bit-identically: the stored vectors, oldest first.

        -> {"feats": [S, dim], "concept_idx": LongTensor [S]} on the CPU (only the S filled rows,
        not the whole [K, capacity, dim] storage). The module's ``state_dict`` stays empty.
        """
        feats, concepts = self.contents()
        return {"feats": feats.cpu(), "concept_idx": concepts.cpu()}

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        """Refill the bank from :meth:`state`; later updates and ``contents()`` are as before the save.

        Each concept's vectors go to slots 0.. in age order, so the write pointer is count % capacity.
        """
        concepts = state["concept_idx"].to(self.counts.device)
        feats = state["feats"]
        if concepts.dim() != 1 or feats.shape != (concepts.shape[0], self.dim):
            raise ValueError(f"a bank state needs feats [S, {self.dim}] and concept_idx [S], got "
                             f"{tuple(feats.shape)} and {tuple(concepts.shape)}")
        if concepts.numel() and not 0 <= int(concepts.min()) <= int(concepts.max()) < self.num_concepts:
            raise ValueError(f"bank state concept indices must lie in [0, {self.num_concepts})")
        order = concepts.argsort(stable=True)
        concepts = concepts[order]
        counts = torch.bincount(concepts, minlength=self.num_concepts)
        if concepts.numel() and int(counts.max()) > self.capacity:
            raise ValueError(
                f"bank state holds {int(counts.max())} vectors for one concept, capacity is {self.capacity}"
            )
        slot = torch.arange(concepts.shape[0], device=concepts.device) - (counts.cumsum(0) - counts)[concepts]
        self.storage[concepts, slot] = feats.to(device=self.storage.device, dtype=self.storage.dtype)[order]
        self.counts.copy_(counts)
        self.heads.copy_(counts % self.capacity)


def _contrastive_term(
    anchor: torch.Tensor,
    keys: torch.Tensor,
    code_sim: torch.Tensor,
    key_codes: torch.Tensor,
    self_cols: Optional[torch.Tensor],
    temp: float,
    pos: float,
    neg: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One anchor image against a set of keys.

    anchor: [P, E] normalised student projections, keys: [S, E] normalised teacher
    projections, code_sim: [P, K] cosine of each anchor's codebook row to every codebook
    row, key_codes: [S] codebook index of each key, self_cols: [P] key column of each
    anchor token (excluded from the positives) or None -> (mean of ℓ over the positive
    pairs, number of positive pairs). The mean is NaN when there is no positive pair.
    """
    logits = anchor @ keys.t() / temp
    shifted = logits - logits.max(dim=1, keepdim=True)[0].detach()
    codes = code_sim[:, key_codes]
    positive = codes > pos
    if self_cols is not None:
        positive[torch.arange(positive.shape[0], device=positive.device), self_cols] = False
    counted = positive | (codes < neg)
    denominator = (shifted.exp() * counted).sum(dim=1, keepdim=True)
    # A row with nothing counted has no positive either; keep its log finite so that its
    # (unused) entries cannot send NaN through the backward pass.
    denominator = torch.where(counted.any(dim=1, keepdim=True), denominator, torch.ones_like(denominator))
    losses = -shifted + torch.log(denominator)
    return losses[positive].mean(), positive.sum()


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
) -> torch.Tensor:
    """Concept-wise contrastive loss L_front with the concept bank (SPEC §5).

    feat: [B, P, D] sampled backbone tokens, proj: [B, P, E] student projections,
    proj_ema: [B, P, E] teacher projections, codebook: [K, D], bank_feats: [S, E] raw
    bank vectors, bank_idx: LongTensor [S] their concepts (S may be 0) -> scalar.
    One term per anchor image against the batch (self excluded) and, with a non-empty
    bank, one against the bank; the result is the mean of the terms that have a positive
    pair (a term without one is skipped; with none at all the result is a zero connected
    to `proj`). Gradients reach `proj` only. Computed in float32 (float64 stays float64).
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
    dtype = torch.promote_types(proj.dtype, torch.float32)
    with torch.autocast(device_type=proj.device.type, enabled=False):
        codebook = codebook.detach().to(dtype)
        codes = vq_index(feat.detach().to(dtype), codebook)
        normed_codebook = F.normalize(codebook, dim=1)
        code_sim = normed_codebook[codes] @ normed_codebook.t()
        student = F.normalize(proj.to(dtype), dim=2)
        teacher = F.normalize(proj_ema.detach().to(dtype), dim=2).reshape(batch * tokens, -1)
        batch_codes = codes.reshape(-1)
        bank = F.normalize(bank_feats.detach().to(device=proj.device, dtype=dtype), dim=1)
        bank_idx = bank_idx.to(proj.device)
        self_cols = torch.arange(tokens, device=proj.device)

        terms, counts = [], []
        for b in range(batch):
            key_sets = [(teacher, batch_codes, self_cols + b * tokens)]
            if bank.shape[0]:
                key_sets.append((bank, bank_idx, None))
            for keys, key_codes, excluded in key_sets:
                term, count = _contrastive_term(student[b], keys, code_sim[b], key_codes, excluded, temp, pos, neg)
                terms.append(term)
                counts.append(count)
        present = [term for term, count in zip(terms, torch.stack(counts).tolist()) if count > 0]
        if not present:
            return proj.sum() * 0
        return sum(present) / float(len(present))
