"""The training loop of every stage: epochs, optimiser steps, logs, save points and the fixed-batch loss.

A stage script builds its networks, defines ``train_step`` (its method step) and calls
:func:`fit`, which is the whole loop::

    for each epoch still to run:
        for each batch (a resumed run skips those it has done):
            on the run's first batch: evaluate the fixed-batch loss (before training)
            values = train_step(epoch, batch)        # one optimiser step (Trainer.step)
            log values; every --save_every steps: save the resumable state
        step the learning-rate schedules; save the resumable state
    evaluate the fixed-batch loss again (after training)

:class:`Trainer` holds the bookkeeping of a run: the AMP loss scaler, the optimiser step, the
JSON-lines log, and the resumable state, saved atomically into the run directory, never over
the final artifacts:

    <run dir>/state_<stage>.pt                  rank 0: everything shared (weights, EMA teacher,
                                                optimisers, schedulers, loss scaler, log records,
                                                position) and rank 0's own part
    <run dir>/state_<stage>.rank<r>.<pos>.pt    rank r > 0: its own part (RNG states, concept bank)

Rank 0's file is written last and names the position ``<pos>`` of the others, so replacing it is
the one step that commits a save. A resumed run continues bit-identically on the CPU.
"""

import contextlib
import glob
import json
import math
import os
import random
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm import tqdm

from utils.atomic import atomic_torch_save, atomic_write_bytes
from utils.distributed import all_reduce_mean, all_reduce_mean_grads, all_reduce_mean_values, barrier
from utils.errors import InputNotFoundError, InvalidInputError, NonFiniteLossError
from utils.visualize import plot_losses

STATE_VERSION = 2
# Under AMP a non-finite loss is one skipped step; this many in a row is divergence, not overflow.
AMP_NONFINITE_PATIENCE = 10
FIXED_BATCH_SEED = 1234


class Batch(NamedTuple):
    img: torch.Tensor  # [B, 3, H, W] normalised, on the run's device
    label: torch.Tensor  # [B, H, W] class ids, -1 = ignore
    ind: torch.Tensor  # [B] dataset indices (CPU)


def rng_state(device):
    """Every random generator this process draws from: torch (CPU and CUDA), numpy, python."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def all_finite(obj):
    """True when every floating-point tensor in a nested dict/list/tuple is finite."""
    if torch.is_tensor(obj):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    return True


def _state_of(obj):
    if torch.is_tensor(obj):
        return obj.detach().clone()
    return obj.state() if hasattr(obj, "load_state") else obj.state_dict()


def _load_into(obj, state):
    if torch.is_tensor(obj):
        with torch.no_grad():
            obj.copy_(state)
    elif hasattr(obj, "load_state"):
        obj.load_state(state)
    else:
        obj.load_state_dict(state)


def step_schedules(schedulers):
    """Step each learning-rate schedule once, at an epoch's end.

    A run resumed from a state saved after an epoch's last batch reaches this before the new
    process's first ``optimizer.step()``, and torch warns about that order; the schedules were
    restored with the state, so their values are right and that one warning is silenced.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Detected call of `lr_scheduler\.step\(\)` before "
            r"`optimizer\.step\(\)`",
        )
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

    ``info``: this process's place in the job; ``log_dir``: the run directory; ``shared``: name ->
    module / optimiser / scheduler / tensor, identical on every rank (their ``state_dict``); ``local``:
    name -> objects that differ per rank, such as a concept bank (``state()`` / ``load_state()``);
    ``flags``: the resolved flags that determine the result (a resumed run must have the same).
    Only rank 0 writes files and shows progress bars.
    """

    def __init__(self, name, info, log_dir, *, epochs, max_steps, save_every, amp, flags, shared, local=None):
        self.name, self.info, self.log_dir = name, info, log_dir
        self.epochs, self.max_steps, self.save_every = epochs, max_steps, save_every
        self.flags = json.loads(json.dumps(flags, sort_keys=True, default=str))
        self.shared, self.local = shared, local or {}
        self.amp = bool(amp) and info.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.amp)
        self.skipped_steps = self.nonfinite_run = self.global_step = 0
        self.epoch = self.batch = 0  # the position of the next batch
        self.fixed = None  # {"ind": the run's first batch, "start": its loss before training}
        self.records = []
        self.saved_state = None  # the last resumable state written, for messages
        self.start = time.time()
        self.log_path = os.path.join(log_dir, f"{name}.jsonl")
        self.state_path = os.path.join(log_dir, f"state_{name}.pt")
        if info.is_main:
            os.makedirs(log_dir, exist_ok=True)
            atomic_write_text(self.log_path, "")

    # -- one step -----------------------------------------------------------------------------

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def check_loss(self, terms):
        """Stop on a non-finite loss (before backward); under AMP it is a skipped step unless it persists.

        ``terms``: name -> scalar; averaged over ranks first, so every rank takes the same decision.
        """
        values = all_reduce_mean_values([float(v) for v in terms.values()], self.info)
        if all(math.isfinite(v) for v in values):
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        if self.scaler.is_enabled() and self.nonfinite_run < AMP_NONFINITE_PATIENCE:
            return
        shown = " ".join(f"{name}={value:.4g}" for name, value in zip(terms, values))
        where = f" (mean over {self.info.world_size} processes)" if self.info.distributed else ""
        raise NonFiniteLossError(
            f"[{self.name}] non-finite loss at step {self.global_step + 1}: {shown}{where}; "
            f"stopped; last good state: {self.saved_state or 'none'}"
        )

    def step(self, loss, optimizers, params, grad_clip=None, clip_params=None, terms=None):
        """Check the loss, backward, average gradients over ranks, clip, and step every optimiser.

        ``params``: all trainable parameters (their gradients are all-reduced); ``clip_params``
        (default ``params``): those whose norm is clipped; ``terms`` (default ``{"loss": loss}``):
        the loss terms named when the loss is not finite. Returns False when the AMP loss scaler
        skipped the step. The gradients are averaged while still scaled, before ``unscale_`` looks
        for inf/NaN, so all ranks skip or step together and keep the same loss scale.
        """
        self.check_loss({k: v.detach() for k, v in (terms or {"loss": loss}).items()})
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        all_reduce_mean_grads(params, self.info)
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
        """Append one record (rank 0) to ``<stage>.jsonl``."""
        record = {"step": self.global_step, **{k: float(v) for k, v in values.items()}}
        self.records.append(record)
        if self.info.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- data ---------------------------------------------------------------------------------

    def batches(self, loader, sampler, epoch, desc):
        """One epoch of ``(Batch, progress bar)`` from the saved position, at most ``max_steps``.

        The order is fixed by ``(seed, epoch)``; the batches a resumed run already trained on are
        passed over without being loaded.
        """
        skip = self.batch
        sampler.set_epoch(epoch, skip * loader.batch_size)
        loader.generator.manual_seed(sampler.seed * 1_000_003 + epoch)
        bar = tqdm(
            loader,
            desc=f"{desc} epoch {epoch + 1}/{self.epochs}",
            initial=skip,
            total=skip + len(loader),
            disable=not self.info.is_main,
            dynamic_ncols=True,
            file=sys.stderr,
            leave=False,
        )
        device = self.info.device
        for it, batch in enumerate(bar, start=skip):
            if self.max_steps is not None and it >= self.max_steps:
                break
            yield (
                Batch(
                    batch["img"].to(device, non_blocking=True),
                    batch["label"].to(device, non_blocking=True),
                    batch["ind"],
                ),
                bar,
            )

    def first_batch(self, dataset):
        """The run's first batch, loaded again from the dataset (for the fixed-batch loss after training)."""
        items = default_collate([dataset[i] for i in self.fixed["ind"]])
        device = self.info.device
        return Batch(items["img"].to(device), items["label"].to(device), items["ind"])

    # -- the resumable state --------------------------------------------------------------------

    def _rank_path(self, rank, position):
        return os.path.join(self.log_dir, f"state_{self.name}.rank{rank}.{position}.pt")

    def _describe(self):
        return f"{self.state_path} (step {self.global_step})"

    def save_due(self):
        return bool(self.save_every) and self.global_step % self.save_every == 0

    def save_state(self):
        """Write the state of every rank; refused (NonFiniteLossError) when any of it is not finite."""
        shared = {name: _state_of(obj) for name, obj in self.shared.items()}
        local = {name: _state_of(obj) for name, obj in self.local.items()}
        if all_reduce_mean(float(all_finite(shared) and all_finite(local)), self.info) < 1.0:
            raise NonFiniteLossError(
                f"[{self.name}] non-finite parameters after step {self.global_step}; the state "
                f"was not saved; last good state: {self.saved_state or 'none'}"
            )
        local["rng"] = rng_state(self.info.device)
        position = f"e{self.epoch}b{self.batch}"
        own = self._rank_path(self.info.rank, position)
        if self.info.rank > 0:
            atomic_torch_save(local, own)
        barrier(self.info)
        if self.info.is_main:
            bookkeeping = {
                "global_step": self.global_step,
                "skipped_steps": self.skipped_steps,
                "nonfinite_run": self.nonfinite_run,
                "scaler": self.scaler.state_dict(),
                "records": list(self.records),
            }
            atomic_torch_save(
                {
                    "version": STATE_VERSION,
                    "stage": self.name,
                    "flags": self.flags,
                    "epoch": self.epoch,
                    "batch": self.batch,
                    "position": position,
                    "fixed": self.fixed,
                    "bookkeeping": bookkeeping,
                    "shared": shared,
                    "local": local,
                },
                self.state_path,
            )
        barrier(self.info)
        self._remove_rank_files(keep=own)
        self.saved_state = self._describe()

    def resume(self, mode):
        """Apply ``--resume no|yes|auto``; True when the run continues from a saved state (RNGs restored)."""
        found = os.path.isfile(self.state_path)
        if mode == "no" or not found:
            if mode == "yes":
                raise InputNotFoundError(
                    f"--resume yes: no resumable state {self.state_path} (the stage finished, "
                    f"or saved none yet); use --resume auto to start over when there is none"
                )
            if found:
                if self.info.is_main:
                    print(f"[{self.name}] --resume no: removing the resumable state {self.state_path}", file=sys.stderr)
                self.remove_states()
            return False
        state = self._read(self.state_path)
        self._check_compatible(state)
        local = (
            state["local"] if self.info.rank == 0 else self._read(self._rank_path(self.info.rank, state["position"]))
        )
        for name, obj in self.shared.items():
            _load_into(obj, state["shared"][name])
        for name, obj in self.local.items():
            _load_into(obj, local[name])
        book = state["bookkeeping"]
        self.global_step, self.skipped_steps = book["global_step"], book["skipped_steps"]
        self.nonfinite_run, self.records = book["nonfinite_run"], list(book["records"])
        self.scaler.load_state_dict(book["scaler"])
        if self.info.is_main:
            atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in self.records))
        self.epoch, self.batch, self.fixed = state["epoch"], state["batch"], state["fixed"]
        set_rng_state(local["rng"], self.info.device)
        self.saved_state = self._describe()
        if self.info.is_main:
            print(
                f"[{self.name}] resuming from {self._describe()}: epoch {self.epoch + 1}, batch {self.batch}",
                file=sys.stderr,
            )
        return True

    def _read(self, path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputNotFoundError(
                f"resumable state {self.state_path} needs {path}, which is missing; rerun with --resume no"
            ) from None
        except Exception as err:  # a truncated or foreign file: any unpickling error
            raise InvalidInputError(
                f"resumable state {path} cannot be read ({type(err).__name__}); rerun with --resume no"
            ) from None

    def _check_compatible(self, state):
        if not isinstance(state, dict) or (state.get("version"), state.get("stage")) != (STATE_VERSION, self.name):
            raise InvalidInputError(
                f"{self.state_path} is not a resumable {self.name} state of this version; rerun with --resume no"
            )
        saved = state["flags"]
        changed = [
            f"--{k} {saved.get(k)!r} -> {self.flags.get(k)!r}"
            for k in sorted(set(saved) | set(self.flags))
            if saved.get(k) != self.flags.get(k)
        ]
        if changed:
            raise InvalidInputError(
                f"resumable state {self.state_path} was saved with other settings "
                f"({', '.join(changed[:4])}); rerun with the same flags, or --resume no"
            )

    def _remove_rank_files(self, keep=None):
        for path in glob.glob(os.path.join(glob.escape(self.log_dir), f"state_{self.name}.rank{self.info.rank}.*")):
            if path != keep:
                os.remove(path)

    def remove_states(self):
        """Remove every resumable state of this stage (the stage finished, or starts over)."""
        barrier(self.info)
        if self.info.is_main:
            for path in glob.glob(f"{glob.escape(self.state_path)}*"):
                os.remove(path)
        self._remove_rank_files()
        barrier(self.info)
        self.saved_state = None

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C inside says where the last resumable state is (the command line prints it)."""
        try:
            yield
        except KeyboardInterrupt:
            if self.saved_state is None:
                raise
            raise KeyboardInterrupt(
                f"resumable state {self.saved_state}: rerun with --resume auto to continue"
            ) from None

    # -- the end --------------------------------------------------------------------------------

    def loss_summary(self, key, start, end):
        """First/last logged ``key`` and the fixed-batch value before/after training (mean over ranks)."""
        values = [r[key] for r in self.records if key in r]
        first, last = (values[0], values[-1]) if values else (None, None)
        return {
            f"{key}_first": first,
            f"{key}_last": last,
            f"fixed_batch_{key}_start": all_reduce_mean(start, self.info),
            f"fixed_batch_{key}_end": all_reduce_mean(end, self.info),
        }

    def finish(self, summary, plot_keys):
        """Write ``<stage>_summary.json`` and ``<stage>_loss.png`` (rank 0), then wait for all ranks."""
        if self.info.is_main:
            summary = {
                "stage": self.name,
                "steps": self.global_step,
                "amp_skipped_steps": self.skipped_steps,
                "seconds": round(time.time() - self.start, 1),
                **summary,
            }
            atomic_write_text(os.path.join(self.log_dir, f"{self.name}_summary.json"), json.dumps(summary, indent=2))
            if self.records:
                plot_losses(self.records, os.path.join(self.log_dir, f"{self.name}_loss.png"), keys=plot_keys)
        barrier(self.info)
        return summary


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode())


def fit(trainer, loader, sampler, train_step, fixed_loss, schedulers=(), desc=""):
    """Train ``trainer.epochs`` epochs from the trainer's position; -> the fixed-batch loss (before, after).

    ``train_step(epoch, batch) -> dict``: one optimiser step of the stage, returning the values to
    log; ``fixed_loss(batch) -> scalar``: the stage's loss, evaluated on the run's first batch before
    and after training under one fixed RNG state (:func:`fixed_batch_loss`); ``schedulers`` step at
    every epoch's end.
    """
    for epoch in range(trainer.epoch, trainer.epochs):
        for batch, bar in trainer.batches(loader, sampler, epoch, desc):
            if trainer.fixed is None:
                trainer.fixed = {"ind": batch.ind.tolist(), "start": fixed_batch_loss(fixed_loss, batch)}
            values = train_step(epoch, batch)
            trainer.log(epoch=epoch, **values)
            bar.set_postfix({k: f"{v:.4g}" for k, v in values.items() if k != "lr"})
            trainer.batch += 1
            if trainer.save_due():
                trainer.save_state()
        step_schedules(schedulers)
        trainer.epoch, trainer.batch = epoch + 1, 0
        trainer.save_state()
    return trainer.fixed["start"], fixed_batch_loss(fixed_loss, trainer.first_batch(loader.dataset))
