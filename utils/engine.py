"""The plumbing the four stage scripts share: data loaders, the optimiser step, logging.

A script builds a :class:`Stage` and drives its own loop; the method itself lives in
``modules/`` and only the bookkeeping lives here.
"""

import contextlib
import itertools
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from utils.atomic import atomic_write_bytes
from utils.distributed import all_reduce_mean, all_reduce_mean_grads, all_reduce_mean_values, barrier
from utils.errors import InvalidInputError, NonFiniteLossError
from utils.visualize import plot_losses

# Under AMP a non-finite loss is one skipped step; this many in a row is divergence, not overflow.
AMP_NONFINITE_PATIENCE = 10


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _worker_init(worker_id):
    seed = torch.initial_seed() % (2 ** 32)
    np.random.seed(seed)
    random.seed(seed)


class EpochSampler(DistributedSampler):
    """This process's share of a dataset, in an order fixed by ``(seed, epoch)``, startable part-way.

    Used for a single process too (one replica), so the data order of an epoch never depends
    on earlier epochs and a resumed run can skip the batches it already trained on without
    loading them: ``set_epoch(epoch, start)`` begins the epoch at sample ``start``.
    """

    def __init__(self, dataset, num_replicas, rank, shuffle, seed, drop_last):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return max(0, self.num_samples - self.start)


def make_loader(dataset, info, batch_size, num_workers, shuffle, drop_last, seed=0):
    """DataLoader over an :class:`EpochSampler` (one replica per process).

    Returns ``(loader, sampler)``; :meth:`Stage.batches` sets the sampler's epoch.
    """
    sampler = EpochSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle, seed=seed,
                           drop_last=drop_last)
    # The loader's generator only seeds the workers; Stage.batches reseeds it from (seed, epoch).
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        drop_last=drop_last, pin_memory=info.device.type == "cuda", worker_init_fn=_worker_init,
                        generator=generator, persistent_workers=False)
    if len(loader) == 0:
        raise InvalidInputError(f"dataset of {len(dataset)} images gives no batch of {batch_size} per process "
                         f"(world size {info.world_size}); lower --batch_size")
    return loader, sampler


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


class Stage:
    """Bookkeeping for one stage run: AMP, optimiser steps, JSON-lines log, summary, loss plot.

    Only rank 0 writes files and shows progress bars. ``saved_state`` names the last resumable
    state written (set by :class:`utils.checkpoint.TrainState`), for the non-finite-loss message.
    """

    def __init__(self, name, info, log_dir, amp):
        self.name = name
        self.info = info
        self.log_dir = log_dir
        self.amp = bool(amp) and info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp)
        self.skipped_steps = 0
        self.nonfinite_run = 0
        self.log_path = os.path.join(log_dir, f"{name}.jsonl")
        self.records = []
        self.start = time.time()
        self.global_step = 0
        self.saved_state = None
        if info.is_main:
            os.makedirs(log_dir, exist_ok=True)
            atomic_write_text(self.log_path, "")

    def state_dict(self):
        return {"global_step": self.global_step, "skipped_steps": self.skipped_steps,
                "nonfinite_run": self.nonfinite_run, "scaler": self.scaler.state_dict(),
                "records": list(self.records)}

    def load_state_dict(self, state):
        """Continue from a saved state; the log is rewritten to the records of that state."""
        self.global_step = state["global_step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_run = state["nonfinite_run"]
        self.scaler.load_state_dict(state["scaler"])
        self.records = list(state["records"])
        if self.info.is_main:
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in self.records))

    def autocast(self):
        if self.amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def progress(self, iterable, desc, total=None, initial=0):
        return tqdm(iterable, desc=desc, total=total, initial=initial, disable=not self.info.is_main,
                    dynamic_ncols=True, file=sys.stderr, leave=False)

    def batches(self, loader, sampler, epoch, n_epochs, max_steps, desc, skip=0):
        """One epoch of ``(img, label, ind, bar)`` on this process's device, at most ``max_steps``.

        The order is fixed by ``(seed, epoch)``; ``skip`` batches at the start of the epoch are
        passed over without being loaded (a resumed run).
        """
        sampler.set_epoch(epoch, skip * loader.batch_size)
        if loader.generator is not None:
            loader.generator.manual_seed(sampler.seed * 1_000_003 + epoch)
        bar = self.progress(loader, desc=f"{desc} epoch {epoch + 1}/{n_epochs}", initial=skip,
                            total=skip + len(loader))
        device = self.info.device
        for it, batch in enumerate(bar, start=skip):
            if max_steps is not None and it >= max_steps:
                break
            yield (batch["img"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True),
                   batch["ind"], bar)

    def check_loss(self, terms):
        """Stop on a non-finite loss (before backward); under AMP it is a skipped step unless it persists.

        ``terms``: name -> scalar tensor or float; the values are averaged over ranks first, so every
        rank takes the same decision.
        """
        values = all_reduce_mean_values([float(v.detach()) if torch.is_tensor(v) else float(v)
                                         for v in terms.values()], self.info)
        if all(math.isfinite(v) for v in values):
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        if self.scaler.is_enabled() and self.nonfinite_run < AMP_NONFINITE_PATIENCE:
            return
        shown = " ".join(f"{name}={value:.4g}" for name, value in zip(terms, values))
        where = f" (mean over {self.info.world_size} processes)" if self.info.distributed else ""
        raise NonFiniteLossError(f"[{self.name}] non-finite loss at step {self.global_step + 1}: {shown}{where}; "
                                 f"stopped; last good state: {self.saved_state or 'none'}")

    def step(self, loss, optimizers, params, grad_clip=None, clip_params=None, terms=None):
        """Check the loss, backward, average gradients over ranks, clip, and step every optimiser.

        ``params`` are all trainable parameters (their gradients are all-reduced);
        ``clip_params`` (default ``params``) are the ones whose norm is clipped; ``terms`` (default
        ``{"loss": loss}``) are the loss terms named when the loss is not finite
        (:class:`~utils.errors.NonFiniteLossError`, raised before backward).
        Returns False when the AMP loss scaler skipped the step (inf/NaN gradients).

        The gradients are averaged while still scaled, before ``unscale_`` looks for inf/NaN:
        every rank then checks the same averaged gradients, so all ranks skip or step together
        and keep the same loss scale (an overflow on one rank reaches all of them).
        """
        self.check_loss(terms if terms is not None else {"loss": loss})
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        all_reduce_mean_grads(params, self.info)
        for opt in optimizers:
            self.scaler.unscale_(opt)
        if grad_clip is not None and grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(clip_params if clip_params is not None else params, grad_clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.global_step += 1
        stepped = scale is None or self.scaler.get_scale() >= scale
        if not stepped:
            self.skipped_steps += 1
        return stepped

    def log(self, **values):
        """Append one record (rank 0) to ``<stage>.jsonl``."""
        record = {"step": self.global_step, **{k: (float(v) if isinstance(v, (int, float, np.floating)) or
                                                   torch.is_tensor(v) else v) for k, v in values.items()}}
        self.records.append(record)
        if self.info.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def loss_summary(self, key, start, end):
        """First/last logged ``key`` and the fixed-batch value before/after training (mean over ranks)."""
        first, last = first_last(self.records, key)
        return {f"{key}_first": first, f"{key}_last": last,
                f"fixed_batch_{key}_start": all_reduce_mean(start, self.info),
                f"fixed_batch_{key}_end": all_reduce_mean(end, self.info)}

    def finish(self, summary, plot_keys):
        """Write ``<stage>_summary.json`` and ``<stage>_loss.png`` (rank 0), then wait for all ranks."""
        if self.info.is_main:
            summary = {"stage": self.name, "steps": self.global_step, "amp_skipped_steps": self.skipped_steps,
                       "seconds": round(time.time() - self.start, 1), **summary}
            atomic_write_text(os.path.join(self.log_dir, f"{self.name}_summary.json"),
                              json.dumps(summary, indent=2))
            if self.records:
                plot_losses(self.records, os.path.join(self.log_dir, f"{self.name}_loss.png"), keys=plot_keys)
        barrier(self.info)
        return summary


def step_schedules(schedulers):
    """Step each learning-rate schedule once, at an epoch's end.

    A run resumed from a state saved after an epoch's last batch reaches this before the new
    process's first ``optimizer.step()``, and torch warns about that order; the schedules were
    restored with the state, so their values are right and that one warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before "
                                                  r"`optimizer\.step\(\)`")
        for scheduler in schedulers:
            scheduler.step()


def first_last(records, key):
    """(first, last) value of ``key`` over the logged records, for summaries."""
    values = [r[key] for r in records if key in r]
    return (values[0], values[-1]) if values else (None, None)


def fixed_batch_loss(loss_fn, *inputs, seed=1234):
    """Evaluate ``loss_fn(*inputs)`` under a fixed RNG state and without gradients.

    Stages call it on their first batch before and after training, so the summary shows
    whether the objective went down on identical inputs, dropout masks and grid picks.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return float(loss_fn(*inputs))
