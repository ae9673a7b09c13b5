"""The resumable state of a training stage: saved atomically, restored so the run ends bit-identically.

A stage script hands :class:`TrainState` everything it trains and drives its loop through
``epochs()`` and ``batches()``; the state is saved every ``--save_every`` optimiser steps and
at every epoch end into the stage's run directory, never over the final artifacts:

    <run dir>/state_<stage>.pt                  rank 0: everything shared (weights, EMA teacher,
                                                optimisers, schedulers, loss scaler, log records,
                                                position) and rank 0's own part
    <run dir>/state_<stage>.rank<r>.<pos>.pt    rank r > 0: its own part (RNG states, concept bank)

Rank 0's file is written last and names the position ``<pos>`` of the others, so replacing it
is the one step that commits a save; an interruption at any moment leaves the previous
complete state. The files are removed when the stage finishes.
"""

import contextlib
import glob
import json
import os
import random
import sys

import numpy as np
import torch
from torch.utils.data import default_collate

from loader.netloader import atomic_torch_save
from utils.distributed import all_reduce_mean, barrier
from utils.errors import InputNotFoundError, InvalidInputError, NonFiniteLossError

STATE_VERSION = 1
# Flags that may differ between an interrupted run and its resumption without changing the result.
RESUME_FREE_FLAGS = ("resume", "save_every", "dist_timeout", "num_workers", "port", "gpu", "cpu", "overwrite",
                     "check")


def rng_state(device):
    """Every random generator this process draws from: torch (CPU and CUDA), numpy, python."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def comparable_flags(args):
    """The resolved flags that determine the result, JSON-normalised."""
    flags = {k: v for k, v in vars(args).items() if k not in RESUME_FREE_FLAGS}
    return json.loads(json.dumps(flags, sort_keys=True, default=str))


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
    return obj.state() if hasattr(obj, "load_state") else obj.state_dict()


def _load_into(obj, state):
    if hasattr(obj, "load_state"):
        obj.load_state(state)
    else:
        obj.load_state_dict(state)


class TrainState:
    """Save, find and restore the resumable state of one stage run.

    ``shared``: name -> module / optimiser / scheduler, identical on every rank (their
    ``state_dict``). ``local``: name -> objects that differ per rank, such as a
    :class:`~modules.bank.ConceptBank` (``state()`` / ``load_state()``). ``fixed_loss(img, label,
    ind)``: the fixed-batch loss of the summary, evaluated on the run's first batch before
    training; a resumed run gets the same first batch back from the dataset.
    """

    def __init__(self, stage, args, loader, sampler, shared, local=None, fixed_loss=None):
        self.stage = stage
        self.info = stage.info
        self.loader = loader
        self.sampler = sampler
        self.shared = shared
        self.local = local or {}
        self.fixed_loss = fixed_loss
        self.n_epochs = args.epoch
        self.max_steps = args.max_steps
        self.save_every = args.save_every
        self.flags = comparable_flags(args)
        self.path = os.path.join(stage.log_dir, f"state_{stage.name}.pt")
        self.epoch = 0
        self.batch = 0
        self.first = None
        self.fixed = None

    # -- where -----------------------------------------------------------------------------

    def _rank_path(self, rank, position):
        return os.path.join(self.stage.log_dir, f"state_{self.stage.name}.rank{rank}.{position}.pt")

    def _position(self):
        return f"e{self.epoch}b{self.batch}"

    def _describe(self):
        return f"{self.path} (step {self.stage.global_step})"

    def _remove_rank_files(self, keep=None):
        pattern = os.path.join(self.stage.log_dir, f"state_{self.stage.name}.rank{self.info.rank}.*")
        for path in glob.glob(pattern):
            if path != keep:
                os.remove(path)

    # -- resume ----------------------------------------------------------------------------

    def resume(self, mode):
        """Apply ``--resume no|yes|auto``; returns True when the run continues from a saved state.

        Call it once everything is built and before the loop: the RNG states are restored here.
        """
        found = os.path.isfile(self.path)
        if mode == "no":
            if found:
                if self.info.is_main:
                    print(f"[{self.stage.name}] --resume no: removing the resumable state {self.path}",
                          file=sys.stderr)
                barrier(self.info)
                self._remove_all()
            return False
        if not found:
            if mode == "yes":
                raise InputNotFoundError(f"--resume yes: no resumable state {self.path} (the stage finished, or "
                                         f"saved none yet); use --resume auto to start over when there is none")
            return False
        state = self._read(self.path)
        self._check_compatible(state)
        local = state["local"] if self.info.rank == 0 else self._read(self._rank_path(self.info.rank,
                                                                                     state["position"]))
        for name, obj in self.shared.items():
            _load_into(obj, state["shared"][name])
        for name, obj in self.local.items():
            _load_into(obj, local[name])
        self.stage.load_state_dict(state["stage_state"])
        self.epoch, self.batch = state["epoch"], state["batch"]
        self.fixed = state["fixed"]
        set_rng_state(local["rng"], self.info.device)
        self.stage.saved_state = self._describe()
        if self.info.is_main:
            print(f"[{self.stage.name}] resuming from {self._describe()}: epoch {self.epoch + 1}, "
                  f"batch {self.batch}", file=sys.stderr)
        return True

    def _read(self, path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputNotFoundError(f"resumable state {self.path} needs {path}, which is missing; "
                                     f"rerun with --resume no") from None
        except Exception as err:  # a truncated or foreign file: any unpickling error
            raise InvalidInputError(f"resumable state {path} cannot be read ({type(err).__name__}); "
                                    f"rerun with --resume no") from None

    def _check_compatible(self, state):
        expected = (STATE_VERSION, self.stage.name)
        if not isinstance(state, dict) or (state.get("version"), state.get("stage")) != expected:
            raise InvalidInputError(f"{self.path} is not a resumable {self.stage.name} state of this version; "
                                    f"rerun with --resume no")
        saved = state["flags"]
        changed = [f"--{k} {saved.get(k)!r} -> {self.flags.get(k)!r}" for k in sorted(set(saved) | set(self.flags))
                   if saved.get(k) != self.flags.get(k)]
        if changed:
            raise InvalidInputError(f"resumable state {self.path} was saved with other settings "
                                    f"({', '.join(changed[:4])}); rerun with the same flags, or --resume no")

    # -- loop ------------------------------------------------------------------------------

    def epochs(self):
        """The epochs still to run; the state is saved after each one (after the caller's scheduler step)."""
        for epoch in range(self.epoch, self.n_epochs):
            yield epoch
            self.epoch, self.batch = epoch + 1, 0
            self.save()

    def batches(self, epoch, desc):
        """:meth:`Stage.batches` from the saved position; saves every ``save_every`` steps after a batch."""
        for img, label, ind, bar in self.stage.batches(self.loader, self.sampler, epoch, self.n_epochs,
                                                       self.max_steps, desc, skip=self.batch):
            if self.fixed is None and self.fixed_loss is not None:
                self.first = (img, label, ind)
                self.fixed = {"ind": ind.tolist(), "start": self.fixed_loss(img, label, ind)}
            yield img, label, ind, bar
            self.batch += 1
            if self.save_every and self.stage.global_step % self.save_every == 0:
                self.save()

    def fixed_batch_losses(self):
        """(start, end): the fixed-batch loss before training and now, on the run's first batch."""
        if self.first is None:
            batch = default_collate([self.loader.dataset[i] for i in self.fixed["ind"]])
            device = self.info.device
            self.first = (batch["img"].to(device), batch["label"].to(device), batch["ind"])
        return self.fixed["start"], self.fixed_loss(*self.first)

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C inside says where the last resumable state is (cli.run prints it)."""
        try:
            yield
        except KeyboardInterrupt:
            if self.stage.saved_state is None:
                raise
            raise KeyboardInterrupt(f"resumable state {self.stage.saved_state}: rerun with --resume auto "
                                    f"to continue") from None

    # -- save ------------------------------------------------------------------------------

    def save(self):
        """Write the state of every rank; refused (NonFiniteLossError) when any of it is not finite."""
        shared = {name: _state_of(obj) for name, obj in self.shared.items()}
        local = {name: _state_of(obj) for name, obj in self.local.items()}
        finite = all_finite(shared) and all_finite(local)
        if all_reduce_mean(float(finite), self.info) < 1.0:
            raise NonFiniteLossError(f"[{self.stage.name}] non-finite parameters after step "
                                     f"{self.stage.global_step}; the state was not saved; last good state: "
                                     f"{self.stage.saved_state or 'none'}")
        local["rng"] = rng_state(self.info.device)
        position = self._position()
        own = self._rank_path(self.info.rank, position)
        if self.info.rank > 0:
            atomic_torch_save(local, own)
        barrier(self.info)
        if self.info.is_main:
            atomic_torch_save({"version": STATE_VERSION, "stage": self.stage.name, "flags": self.flags,
                               "epoch": self.epoch, "batch": self.batch, "position": position,
                               "fixed": self.fixed, "stage_state": self.stage.state_dict(),
                               "shared": shared, "local": local}, self.path)
        barrier(self.info)
        self._remove_rank_files(keep=own)
        self.stage.saved_state = self._describe()

    def finish(self):
        """The stage completed and its final artifacts are written: remove every state file."""
        barrier(self.info)
        self._remove_all()
        self.stage.saved_state = None

    def _remove_all(self):
        if self.info.is_main:
            for path in glob.glob(f"{self.path}*"):
                os.remove(path)
        self._remove_rank_files()
        barrier(self.info)
