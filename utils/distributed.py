"""One process per device: torchrun (its environment as it is, multi-node included), ``--gpu 0,1,..`` spawning
one process per id on this machine like the reference, or a single process. NCCL on CUDA, gloo on CPU.
"""

import datetime
import multiprocessing.connection
import os
import pickle
import signal
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.errors import (
    EXIT_CODES,
    EXIT_TERMINATED,
    REPORTED_ERRORS,
    InvalidInputError,
    SpawnedExit,
    WorkerFailedError,
    one_line,
    show_warning,
)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def parse_gpu_ids(gpu):
    try:
        return [int(g) for g in str(gpu).split(",") if g.strip() != ""]
    except ValueError:
        raise InvalidInputError(f"--gpu expects comma-separated integers such as 0,1,2,3, got {gpu!r}") from None


def setup(gpu="0", use_cpu=False, timeout_min=10.0):
    """Initialise this process's place in the job and return it. ``timeout_min`` (``--dist_timeout``) bounds
    every collective: a process whose peer died stops with an error instead of waiting for ever."""
    env = os.environ
    if under_torchrun():  # GPU: the local rank
        rank, world, gpu_ids = int(env["RANK"]), int(env["WORLD_SIZE"]), []
        local_rank = int(env.get("LOCAL_RANK", rank))
    else:  # GPU: the local rank's id in --gpu
        rank, world = int(env.get("CAUSE_SPAWN_RANK", 0)), int(env.get("CAUSE_SPAWN_WORLD", 1))
        local_rank, gpu_ids = rank, parse_gpu_ids(gpu)
    if use_cpu or not torch.cuda.is_available():
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", gpu_ids[local_rank] if local_rank < len(gpu_ids) else local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout, store = datetime.timedelta(minutes=timeout_min), None
        if under_torchrun():
            # torchrun keeps one key-value store across the restarts of --max-restarts: a restarted group must not
            # read the addresses its killed predecessor left there, so each attempt writes keys of its own.
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
            store = dist.PrefixStore(f"attempt{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup():
    """Tear the process group down at once (any exit path; no collective, so no wait on a dead peer)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leave():
    """Leave the process group after a successful run: a barrier, so no rank tears its connections down while a
    peer still uses them, then destroy it before the interpreter exits (gloo's threads must not outlive it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's pre-emption): exit code 143, after saving the resumable state when training."""

    exit_code = EXIT_TERMINATED


class Preemption:
    """The SIGTERM handler: raises :class:`Terminated` at once, or, inside :func:`fit`, at the step's end."""

    def __init__(self):
        self.deferred = self.received = False

    def __call__(self, signum, frame):
        self.received = True
        if not self.deferred:
            raise Terminated()

    def install(self):
        """Handle SIGTERM (in the main thread); returns the previous handler."""
        self.deferred = self.received = False
        return signal.signal(signal.SIGTERM, self)

    @staticmethod
    def restore(previous):
        signal.signal(signal.SIGTERM, previous)


PREEMPTION = Preemption()  # the process's one SIGTERM handler (engine.cli.run and spawned processes install it)


def _spawned(local_rank, main, args, world, port):
    env = dict(CAUSE_SPAWN_RANK=local_rank, CAUSE_SPAWN_WORLD=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ.update({name: str(value) for name, value in env.items()})
    PREEMPTION.install()
    warnings.showwarning = show_warning
    try:
        main(args)
        leave()
    except REPORTED_ERRORS as err:
        # Only the exit code crosses the spawn boundary cleanly: report here, exit with its code there.
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    except Terminated as err:
        if local_rank == 0:
            print(f"terminated (SIGTERM){': ' + err.args[0] if err.args else ''}", file=sys.stderr)
        sys.exit(EXIT_TERMINATED)
    finally:
        # On every way out: exiting with gloo still up can abort (SIGABRT) in finalisation, hiding the exit code.
        cleanup()


def launch(main, args):
    """Run ``main(args)`` once per process: directly under torchrun or for one id, spawned for several.

    If a spawned process fails, the others are killed (as torchrun does): a reported one-line error passes its
    exit code on, a process killed or exiting without a report becomes a :class:`WorkerFailedError`, a bug keeps
    its traceback. SIGTERM is passed to every spawned process; they save their state at one step and exit 143.
    """
    world = len(parse_gpu_ids(args.gpu))
    if under_torchrun() or world <= 1:
        return main(args)
    context = mp.start_processes(_spawned, args=(main, args, world, args.port), nprocs=world, join=False)

    def pass_on(signum, frame):
        for process in context.processes:
            if process.is_alive():
                os.kill(process.pid, signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        failed = _join(context.processes)
    finally:
        signal.signal(signal.SIGTERM, previous)
    if failed is None:
        if any(process.exitcode != 0 for process in context.processes):
            raise SpawnedExit(EXIT_TERMINATED)
        return
    if os.access(context.error_files[failed], os.R_OK):  # an exception that is a bug: its traceback
        with open(context.error_files[failed], "rb") as f:
            trace = pickle.load(f)
        raise mp.ProcessRaisedException(f"\n\n-- process {failed} failed:\n{trace}", failed, None)
    code = context.processes[failed].exitcode
    if code in EXIT_CODES and code > 1:
        raise SpawnedExit(code)
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    then = "the other processes were stopped (a resumable state, if one was saved, continues with --resume auto)"
    raise WorkerFailedError(f"process {failed} of {world} {how}; {then}")


def _join(processes):
    """Wait for every process; -> the index of the first that failed (the others are then killed), or None.
    Exit code 143 (SIGTERM, state saved) is no failure: the other ranks stop at the same step themselves."""
    pending = {process.sentinel: index for index, process in enumerate(processes)}
    while pending:
        for sentinel in multiprocessing.connection.wait(list(pending)):
            index = pending.pop(sentinel)
            processes[index].join()
            if processes[index].exitcode not in (0, EXIT_TERMINATED):
                for other in processes:
                    if other.is_alive():
                        other.kill()
                    other.join()
                return index
    return None


def all_reduce_mean_grads(params, info):
    """Average the gradients of ``params`` over ranks in one flat all-reduce (what DDP does), on the still-scaled
    AMP gradients, before ``GradScaler.unscale_``. Not DDP itself: the stages do not train one module's
    ``forward`` (a bare codebook; heads, probe and teacher called separately), which DDP's reducer tracks."""
    grads = [p.grad for p in params if p.grad is not None] if info.distributed else []
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def all_reduce_mean_values(values, info):
    """Mean over ranks of a list of python floats, in one all-reduce; NaN and inf propagate."""
    values = [float(v) for v in values]
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return (t / info.world_size).tolist()


def all_reduce_mean(value, info):
    """Mean of a python float over ranks (for logging)."""
    return all_reduce_mean_values([value], info)[0]


def barrier(info):
    if info.distributed:
        dist.barrier()


def broadcast_from_main(tensors, info):
    """Give every rank rank 0's values of ``tensors`` (in place), as DDP does with a model's initial weights."""
    if info.distributed:
        with torch.no_grad():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)
