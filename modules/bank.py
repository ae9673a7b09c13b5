"""The concept bank of the front-door stage (SPEC §5): one FIFO of teacher projections per concept.

The concept-wise contrastive loss that reads it is ``modules.objectives.front_door_loss``.
"""

import torch
import torch.nn as nn
from torch import Tensor


class ConceptBank(nn.Module):
    """One FIFO of at most `capacity` raw teacher projections per concept (SPEC §5).

    Storage is a preallocated ring buffer [K, capacity, dim] with a fill count and a write pointer per concept,
    all non-persistent buffers: `.to(device)` / `.double()` move them, state dicts never contain them. The
    storage dtype is the module's (float32 unless the module is cast); incoming vectors are cast to it.
    """

    def __init__(self, num_concepts: int, dim: int, capacity: int = 100, keep_ratio: float = 0.5):
        super().__init__()
        if num_concepts < 1 or dim < 1 or capacity < 1:
            raise ValueError(
                f"ConceptBank needs num_concepts, dim, capacity >= 1, got {num_concepts}, {dim}, {capacity}"
            )
        if not 0.0 <= keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must lie in [0, 1], got {keep_ratio}")
        self.num_concepts, self.dim, self.capacity, self.keep_ratio = num_concepts, dim, capacity, keep_ratio
        # Zeros, not garbage: `slots` exposes the empty slots too (the loss ignores them, but a NaN there
        # would still reach the matmul).
        self.register_buffer("storage", torch.zeros(num_concepts, capacity, dim), persistent=False)
        self.register_buffer("counts", torch.zeros(num_concepts, dtype=torch.long), persistent=False)
        self.register_buffer("heads", torch.zeros(num_concepts, dtype=torch.long), persistent=False)

    def __len__(self) -> int:
        return int(self.counts.sum())

    def _random_subset(self, concept_idx: Tensor, generator: torch.Generator | None) -> Tensor:
        """Rows kept by one update: a uniformly random ⌊keep_ratio·n⌋ of the n rows of each concept.

        concept_idx: [M] -> LongTensor [L] of row indices, concept ascending, input order within a concept.
        """
        device = generator.device if generator is not None else concept_idx.device
        keys = torch.rand(concept_idx.shape[0], generator=generator, device=device).to(concept_idx.device)
        # Sorted by (concept, random key): composite keys are unique, so no order is left to the
        # sort's stability (which CUDA and CPU sorts need not share).
        rows = concept_idx.shape[0]
        by_key = keys.argsort()
        ranked = by_key[(concept_idx[by_key] * rows + torch.arange(rows, device=by_key.device)).argsort()]
        seen = torch.bincount(concept_idx, minlength=self.num_concepts)
        rank = torch.arange(ranked.shape[0], device=ranked.device) - (seen.cumsum(0) - seen)[concept_idx[ranked]]
        quota = torch.floor(seen.double() * self.keep_ratio).long()
        keep = torch.zeros_like(concept_idx, dtype=torch.bool)
        keep[ranked] = rank < quota[concept_idx[ranked]]
        kept = keep.nonzero().squeeze(1)
        return kept[(concept_idx[kept] * rows + kept).argsort()]

    @torch.no_grad()
    def update(self, concept_idx: Tensor, feats: Tensor, generator: torch.Generator | None = None) -> None:
        """Append a random ⌊keep_ratio·n⌋ of each concept's n vectors, dropping the oldest.

        concept_idx: LongTensor [M] in [0, K), feats: [M, dim]. Kept vectors are appended in their input order;
        if more than `capacity` are appended to one concept at once, the last `capacity` of them survive.
        """
        if concept_idx.dim() != 1 or feats.shape != (concept_idx.shape[0], self.dim):
            msg = f"ConceptBank.update needs concept_idx [M] and feats [M, {self.dim}], got"
            raise ValueError(f"{msg} {tuple(concept_idx.shape)} and {tuple(feats.shape)}")
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

    def contents(self) -> tuple[Tensor, Tensor]:
        """-> (feats [S, dim] raw, concept_idx [S]): every stored vector, concept ascending, oldest first."""
        concepts, slot = self._filled()
        return self.storage[concepts, slot], concepts

    def _filled(self) -> tuple[Tensor, Tensor]:
        """(concept [S], slot [S]) of every stored vector, concept ascending, oldest first."""
        concepts = torch.repeat_interleave(torch.arange(self.num_concepts, device=self.counts.device), self.counts)
        age = torch.arange(concepts.shape[0], device=concepts.device) - (self.counts.cumsum(0) - self.counts)[concepts]
        return concepts, (self.heads[concepts] - self.counts[concepts] + age) % self.capacity

    def state(self) -> dict:
        """What a resumed run needs to continue bit-identically: the stored vectors where they sit.

        -> {"feats": [S, dim], "concept_idx": [S], "slot": [S], "heads": [K]} on the CPU: only the S filled rows,
        each with its ring-buffer slot, so that a restored bank has the same layout (``slots()`` reads the
        storage in place, and the loss sums its keys in that order). The module's ``state_dict`` stays empty.
        """
        concepts, slot = self._filled()
        state = {"feats": self.storage[concepts, slot], "concept_idx": concepts, "slot": slot, "heads": self.heads}
        return {key: value.cpu() for key, value in state.items()}

    @torch.no_grad()
    def load_state(self, state: dict) -> None:
        """Refill the bank from :meth:`state`: same vectors in the same slots, same write pointers."""
        device = self.counts.device
        concepts, slot, feats = state["concept_idx"].to(device), state["slot"].to(device), state["feats"]
        if concepts.dim() != 1 or slot.shape != concepts.shape or feats.shape != (concepts.shape[0], self.dim):
            msg = f"a bank state needs feats [S, {self.dim}], concept_idx [S] and slot [S], got"
            raise ValueError(f"{msg} {tuple(feats.shape)}, {tuple(concepts.shape)} and {tuple(slot.shape)}")
        if concepts.numel() and not 0 <= int(concepts.min()) <= int(concepts.max()) < self.num_concepts:
            raise ValueError(f"bank state concept indices must lie in [0, {self.num_concepts})")
        if slot.numel() and not 0 <= int(slot.min()) <= int(slot.max()) < self.capacity:
            raise ValueError(f"bank state slots must lie in [0, {self.capacity})")
        self.storage.zero_()
        self.storage[concepts, slot] = feats.to(device=self.storage.device, dtype=self.storage.dtype)
        self.counts.copy_(torch.bincount(concepts, minlength=self.num_concepts))
        self.heads.copy_(state["heads"].to(self.heads.device))

    def slots(self) -> tuple[Tensor, Tensor]:
        """The storage itself, without a copy: every slot with its concept, -1 where empty.

        -> (feats [K·capacity, dim] raw, a view of the storage; concept_idx LongTensor [K·capacity], -1 for an
        empty slot). Same vectors as `contents` in storage order; `front_door_loss` takes it as the bank and
        gives the same loss as with `contents`.
        """
        filled = torch.arange(self.capacity, device=self.counts.device) < self.counts[:, None]
        concepts = torch.arange(self.num_concepts, device=self.counts.device)[:, None].expand_as(filled)
        return self.storage.view(-1, self.dim), torch.where(filled, concepts, -1).reshape(-1)

    def loss_keys(self) -> tuple[Tensor, Tensor]:
        """The bank as `front_door_loss` reads it most cheaply: `slots` (no copy) once at least half full, the
        compact `contents` before (fewer keys to score)."""
        return self.slots() if 2 * len(self) >= self.num_concepts * self.capacity else self.contents()
