"""Batches of a dataset for one process of a job: the order of an epoch fixed by ``(seed, epoch)``."""

import itertools
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from utils.errors import InvalidInputError


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _worker_init(worker_id):
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


class EpochSampler(DistributedSampler):
    """This process's share of a dataset, in an order fixed by ``(seed, epoch)``, startable part-way.

    Used for a single process too (one replica), so the data order of an epoch never depends on earlier epochs and
    a resumed run skips the batches it already trained on without loading them (``set_epoch(epoch, start)``).
    """

    start = 0  # the first sample of the epoch

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return max(0, self.num_samples - self.start)


def make_loader(dataset, info, batch_size, num_workers, shuffle, drop_last, seed=0):
    """DataLoader over an :class:`EpochSampler` (one replica per process) -> ``(loader, sampler)``; ``info``: a
    ``utils.distributed.DistInfo``. Its generator only seeds the workers (the training loop reseeds it per epoch)."""
    sampler = EpochSampler(dataset, info.world_size, info.rank, shuffle, seed, drop_last)
    workers = dict(num_workers=num_workers, worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed))
    pin = info.device.type == "cuda"
    loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=drop_last, pin_memory=pin, **workers)
    if len(loader) == 0:
        problem = f"dataset of {len(dataset)} images gives no batch of {batch_size} per process"
        raise InvalidInputError(f"{problem} (world size {info.world_size}); lower --batch_size")
    return loader, sampler
