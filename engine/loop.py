"""The training loop of every stage: epochs, optimiser steps, logs, save points, the fixed-batch loss.

A stage script builds its networks, defines ``train_step`` (its method step) and calls :func:`fit`, the whole loop.
:class:`Trainer` keeps the run's bookkeeping: the AMP loss scaler, the optimiser step, the log and the resumable state
(``engine/state.py``; a resumed run continues bit-identically on the CPU). While a run goes on, its log and
configuration are ``<name>.running.*``; they take their final names when it completes, so an aborted rerun never
hides the last complete run's.
"""

import contextlib
import json
import math
import os
import sys
import time
import warnings
from typing import NamedTuple

import torch
from torch.utils.data import default_collate
from tqdm import tqdm

from engine.state import ResumableState
from utils import distributed
from utils.atomic import OutputWriteError, atomic_write_bytes
from utils.distributed import PREEMPTION, Terminated
from utils.errors import NonFiniteLossError

# The loop's own part of the resumable state.
LOOP_STATE = ("epoch", "batch", "fixed", "global_step", "skipped_steps", "nonfinite_run", "records")
AMP_NONFINITE_PATIENCE = 10  # under AMP a non-finite loss skips a step; this many in a row is divergence
FIXED_BATCH_SEED = 1234


class Batch(NamedTuple):
    img: torch.Tensor  # [B, 3, H, W] normalised, on the run's device
    label: torch.Tensor  # [B, H, W] class ids, -1 = ignore
    ind: torch.Tensor  # [B] dataset indices (CPU)


def running_name(path):
    """``a/log.jsonl`` -> ``a/log.running.jsonl``: the file of a run still in progress."""
    root, ext = os.path.splitext(path)
    return f"{root}.running{ext}"


def step_schedules(schedulers):
    """Step each learning-rate schedule at an epoch's end (a resumed schedule without torch's order warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for scheduler in schedulers:
            scheduler.step()


def fixed_batch_loss(loss_fn, batch, seed=FIXED_BATCH_SEED):
    """``loss_fn(batch)`` under a fixed RNG state and without gradients (same dropout masks and grid picks)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        return float(loss_fn(batch))


class Trainer:
    """Bookkeeping of one stage run: AMP, optimiser steps, log, summary and the resumable state.

    ``shared``, ``local``, ``flags``: what the resumable state holds (:class:`engine.state.ResumableState`).
    Only rank 0 writes files and shows progress bars.
    """

    def __init__(self, name, info, log_dir, *, epochs, max_steps, save_every, amp, flags, shared, local=None):
        self.name, self.info, self.log_dir = name, info, log_dir
        self.epochs, self.max_steps, self.save_every = epochs, max_steps, save_every
        flags = json.loads(json.dumps(flags, sort_keys=True, default=str))
        self.state = ResumableState(name, info, log_dir, flags, shared, local)
        # Every rank starts from rank 0's weights (each drew its own random initialisation), as under DDP.
        modules = [obj for obj in shared.values() if isinstance(obj, torch.nn.Module)]
        tensors = [obj for obj in shared.values() if torch.is_tensor(obj)]
        distributed.broadcast_from_main(tensors + [t for m in modules for t in (*m.parameters(), *m.buffers())], info)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=bool(amp) and info.device.type == "cuda")
        self.skipped_steps = self.nonfinite_run = self.global_step = self.epoch = self.batch = 0
        self.fixed = None  # {"ind": the run's first batch, "start": its loss before training}
        self.records, self.saved_state, self.start = [], None, time.time()
        self.log_path = os.path.join(log_dir, f"{name}.jsonl")
        self.config_path = os.path.join(log_dir, f"config_{name}.json")
        if info.is_main:
            atomic_write_bytes(running_name(self.log_path), b"")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.scaler.is_enabled() else contextlib.nullcontext()

    def check_loss(self, terms):
        """Stop on a non-finite loss (mean over ranks, before backward); under AMP, only if it persists."""
        values = distributed.all_reduce_mean_values([float(v) for v in terms.values()], self.info)
        if all(math.isfinite(v) for v in values):
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        if self.scaler.is_enabled() and self.nonfinite_run < AMP_NONFINITE_PATIENCE:
            return
        shown = " ".join(f"{name}={value:.4g}" for name, value in zip(terms, values))
        where = f" (mean over {self.info.world_size} processes)" if self.info.distributed else ""
        last = f"; stopped; last good state: {self.saved_state or 'none'}"
        raise NonFiniteLossError(f"[{self.name}] non-finite loss at step {self.global_step + 1}: {shown}{where}{last}")

    def step(self, loss, optimizers, params, grad_clip=None, clip_params=None, terms=None):
        """Check the loss, backward, average gradients over ranks, clip, and step every optimiser.

        ``params``: all trainable parameters (their gradients are all-reduced, still scaled, before
        ``unscale_`` looks for inf/NaN, so all ranks skip or step together); ``clip_params``
        (default ``params``): those whose norm is clipped; ``terms``: the loss terms named when the
        loss is not finite. Returns False when the AMP loss scaler skipped the step.
        """
        self.check_loss({k: v.detach() for k, v in (terms or {"loss": loss}).items()})
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.all_reduce_mean_grads(params, self.info)
        for opt in optimizers:
            self.scaler.unscale_(opt)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(clip_params if clip_params is not None else params, grad_clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.global_step += 1
        stepped = scale is None or self.scaler.get_scale() >= scale
        self.skipped_steps += not stepped
        return stepped

    def log(self, **values):
        """Append one record (rank 0); a failed write is one line, and leaves the log line-complete."""
        self.records.append({"step": self.global_step, **{k: float(v) for k, v in values.items()}})
        if self.info.is_main:
            path = running_name(self.log_path)
            size = os.path.getsize(path)
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(self.records[-1]) + "\n")
            except OSError as err:
                os.truncate(path, size)
                kept = f"the log keeps its complete lines, the last resumable state is {self.saved_state or 'none'}"
                raise OutputWriteError(f"cannot write {path}: {err.strerror or err}; {kept}") from None

    def batches(self, loader, sampler, epoch, desc):
        """One epoch of ``(Batch, progress bar)`` from the saved position, at most ``max_steps`` batches.

        The order is fixed by ``(seed, epoch)``; the batches a resumed run already trained on are not loaded.
        """
        sampler.set_epoch(epoch, self.batch * loader.batch_size)
        loader.generator.manual_seed(sampler.seed * 1_000_003 + epoch)
        progress = {"initial": self.batch, "total": self.batch + len(loader), "disable": not self.info.is_main}
        bar = tqdm(loader, desc=f"{desc} epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True, leave=False, **progress)
        device = self.info.device
        for it, batch in enumerate(bar, start=self.batch):
            if self.max_steps is not None and it >= self.max_steps:
                break
            img, label = batch["img"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
            yield Batch(img, label, batch["ind"]), bar

    def first_batch(self, dataset):
        """The run's first batch, loaded again (for the fixed-batch loss after training)."""
        items = default_collate([dataset[i] for i in self.fixed["ind"]])
        return Batch(items["img"].to(self.info.device), items["label"].to(self.info.device), items["ind"])

    def save_state(self):
        loop = {key: getattr(self, key) for key in LOOP_STATE}
        self.state.save({**loop, "scaler": self.scaler.state_dict()}, self.saved_state)
        self.saved_state = f"{self.state.path} (step {self.global_step})"

    def resume(self, mode):
        """Apply ``--resume no|yes|auto``; True when the run continues from a saved state."""
        loop = self.state.load(mode)
        if loop is None:
            return False
        for key in LOOP_STATE:
            setattr(self, key, loop[key])
        self.scaler.load_state_dict(loop["scaler"])
        self.saved_state = f"{self.state.path} (step {self.global_step})"
        if self.info.is_main:
            log = "".join(json.dumps(record) + "\n" for record in self.records)
            atomic_write_bytes(running_name(self.log_path), log.encode())
            print(f"[{self.name}] resuming from {self.saved_state}: epoch {self.epoch + 1}", file=sys.stderr)
        return True

    def remove_states(self):
        """The stage finished (or starts over): its resumable state is removed."""
        self.state.remove()
        self.saved_state = None

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C or SIGTERM inside says where the last resumable state is (the command line prints it)."""
        try:
            yield
        except KeyboardInterrupt as stop:
            if self.saved_state is None:
                raise
            raise type(stop)(f"resumable state {self.saved_state}: rerun with --resume auto to continue") from None

    def terminating(self):
        """Whether any rank received SIGTERM (all ranks agree, so they save and stop at the same step)."""
        return distributed.all_reduce_mean(float(PREEMPTION.received), self.info) > 0

    def loss_summary(self, key, start, end):
        """First/last logged ``key`` and the fixed-batch value before/after training (mean over ranks)."""
        values = [r[key] for r in self.records if key in r]
        first, last = (values[0], values[-1]) if values else (None, None)
        start, end = distributed.all_reduce_mean(start, self.info), distributed.all_reduce_mean(end, self.info)
        fixed = f"fixed_batch_{key}"
        return {f"{key}_first": first, f"{key}_last": last, f"{fixed}_start": start, f"{fixed}_end": end}

    def finish(self, summary, plot_keys):
        """The run is complete: its log and configuration take their final names; write ``<stage>_summary.json``
        and ``<stage>_loss.png`` (rank 0), then wait for all ranks."""
        from utils.visualize import plot_losses  # matplotlib, only once a run ends

        if self.info.is_main:
            for path in (self.log_path, self.config_path):
                if os.path.exists(running_name(path)):
                    os.replace(running_name(path), path)
            steps = {"stage": self.name, "steps": self.global_step, "amp_skipped_steps": self.skipped_steps}
            summary = {**steps, "seconds": round(time.time() - self.start, 1), **summary}
            path = os.path.join(self.log_dir, f"{self.name}_summary.json")
            atomic_write_bytes(path, json.dumps(summary, indent=2).encode())
            if self.records:
                plot_losses(self.records, os.path.join(self.log_dir, f"{self.name}_loss.png"), keys=plot_keys)
        distributed.barrier(self.info)
        return summary


def fit(trainer, loader, sampler, train_step, fixed_loss, schedulers=(), desc=""):
    """Train ``trainer.epochs`` epochs from the trainer's position; -> the fixed-batch loss (before, after).

    ``train_step(epoch, batch) -> dict``: one optimiser step, returning the values to log; ``fixed_loss(batch)``:
    the stage's loss, evaluated on the run's first batch before and after training (:func:`fixed_batch_loss`);
    ``schedulers`` step at every epoch's end. A SIGTERM stops the run at the end of a step, state saved.
    """
    PREEMPTION.deferred = True
    try:
        for epoch in range(trainer.epoch, trainer.epochs):
            for batch, bar in trainer.batches(loader, sampler, epoch, desc):
                if trainer.fixed is None:
                    trainer.fixed = {"ind": batch.ind.tolist(), "start": fixed_batch_loss(fixed_loss, batch)}
                values = train_step(epoch, batch)
                trainer.log(epoch=epoch, **values)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k != "lr"})
                trainer.batch += 1
                if trainer.terminating():
                    trainer.save_state()
                    raise Terminated()
                if trainer.save_every and trainer.global_step % trainer.save_every == 0:
                    trainer.save_state()
            step_schedules(schedulers)
            trainer.epoch, trainer.batch = epoch + 1, 0
            trainer.save_state()
    finally:
        PREEMPTION.deferred = False
    return trainer.fixed["start"], fixed_batch_loss(fixed_loss, trainer.first_batch(loader.dataset))
