"""The resumable state of a training stage on disk: written atomically, read back to continue bit-identically.

Rank 0 writes ``<run dir>/state_<stage>.pt`` (shared weights and optimisers, the loop's position, its own RNGs); rank
r > 0 its own part (RNGs, concept bank) to ``state_<stage>.rank<r>.<position>.pt``, named by rank 0's file, so
replacing rank 0's file is what commits a save.
"""

import glob
import os
import random

import numpy as np
import torch

from utils.atomic import atomic_torch_save
from utils.distributed import all_reduce_mean, barrier
from utils.errors import InputNotFoundError, InvalidInputError, NonFiniteLossError

VERSION = 2


def rng_state(device):
    """Every random generator this process draws from: torch (CPU and CUDA), numpy, python."""
    name, keys, *rest = np.random.get_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    numpy = [name, keys.tolist(), *rest]
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy, "python": random.getstate()}


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
    if isinstance(obj, (dict, list, tuple)):
        return all(all_finite(v) for v in (obj.values() if isinstance(obj, dict) else obj))
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


class ResumableState:
    """The state files of one stage run.

    ``shared``: name -> module / optimiser / scheduler / tensor, identical on every rank; ``local``: name -> per-rank
    objects such as a concept bank (``state()`` / ``load_state()``); ``flags``: what a resuming run must share.
    """

    def __init__(self, name, info, directory, flags, shared, local=None):
        self.name, self.info, self.directory, self.flags = name, info, directory, flags
        self.shared, self.local = shared, local or {}
        self.path = os.path.join(directory, f"state_{name}.pt")

    def _rank_path(self, rank, position):
        return os.path.join(self.directory, f"state_{self.name}.rank{rank}.{position}.pt")

    def save(self, loop, describe_last):
        """Write every rank's state and ``loop`` (the loop's bookkeeping and position, by rank 0).

        A non-finite state is refused (NonFiniteLossError, naming ``describe_last``, the last good state)."""
        shared = {name: _state_of(obj) for name, obj in self.shared.items()}
        local = {name: _state_of(obj) for name, obj in self.local.items()}
        if all_reduce_mean(float(all_finite(shared) and all_finite(local)), self.info) < 1.0:
            step = loop["global_step"]
            last = f"last good state: {describe_last or 'none'}"
            raise NonFiniteLossError(f"[{self.name}] non-finite parameters after step {step}; not saved; {last}")
        local["rng"] = rng_state(self.info.device)
        position = f"e{loop['epoch']}b{loop['batch']}"
        own = self._rank_path(self.info.rank, position)
        if self.info.rank > 0:
            atomic_torch_save(local, own)
        barrier(self.info)
        if self.info.is_main:
            header = {"version": VERSION, "stage": self.name, "flags": self.flags, "position": position}
            atomic_torch_save({**header, "loop": loop, "shared": shared, "local": local}, self.path)
        barrier(self.info)
        self._remove_rank_files(keep=own)

    def load(self, mode):
        """Apply ``--resume no|yes|auto``: the saved loop bookkeeping (objects and RNGs restored), or None."""
        found = os.path.isfile(self.path)
        if mode == "yes" and not found:
            why = "(the stage finished, or saved none yet); use --resume auto to start over when there is none"
            raise InputNotFoundError(f"--resume yes: no resumable state {self.path} {why}")
        if mode == "no" or not found:
            if found:
                self.remove()
            return None
        state = self._read(self.path)
        self._check_compatible(state)
        rank = self.info.rank
        local = state["local"] if rank == 0 else self._read(self._rank_path(rank, state["position"]))
        for objects, states in ((self.shared, state["shared"]), (self.local, local)):
            for name, obj in objects.items():
                _load_into(obj, states[name])
        set_rng_state(local["rng"], self.info.device)
        return state["loop"]

    def _read(self, path):
        fix = "rerun with --resume no"
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InputNotFoundError(f"resumable state {self.path} needs {path}, which is missing; {fix}") from None
        except Exception as err:  # a truncated or foreign file: any unpickling error
            raise InvalidInputError(f"resumable state {path} cannot be read ({type(err).__name__}); {fix}") from None

    def _check_compatible(self, state):
        if not isinstance(state, dict) or (state.get("version"), state.get("stage")) != (VERSION, self.name):
            message = f"{self.path} is not a resumable {self.name} state of this version; rerun with --resume no"
            raise InvalidInputError(message)
        saved, now = state["flags"], self.flags
        for what in ("upstream", "dataset"):
            if saved.get(what) != now.get(what):
                raise InvalidInputError(
                    f"resumable state {self.path} was trained on another {what} ({saved.get(what)}, now "
                    f"{now.get(what)}); rerun without --resume, or restore the {what} it was trained on"
                )
        keys = sorted(set(saved) | set(now))
        changed = [f"--{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
        if changed:
            raise InvalidInputError(
                f"resumable state {self.path} was saved with other settings ({', '.join(changed[:4])}); rerun with "
                f"the same flags, or --resume no"
            )

    def _remove_rank_files(self, keep=None):
        pattern = os.path.join(glob.escape(self.directory), f"state_{self.name}.rank{self.info.rank}.*")
        for path in glob.glob(pattern):
            if path != keep:
                os.remove(path)

    def remove(self):
        """Remove every state file of this stage (the stage finished, or starts over)."""
        barrier(self.info)
        if self.info.is_main:
            for path in glob.glob(f"{glob.escape(self.path)}*"):
                os.remove(path)
        self._remove_rank_files()
        barrier(self.info)
