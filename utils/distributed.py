"""One process per device: torchrun, ``--gpu 0,1,..`` spawning, or a single process.

Under ``torchrun`` the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read as it is,
which covers multi-node runs. Otherwise ``--gpu`` with several ids spawns one process per id on this
machine, like the reference. NCCL on CUDA, gloo on CPU.
"""

import datetime
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.errors import EXIT_CODES, REPORTED_ERRORS, InvalidInputError, SpawnedExit, WorkerFailedError, one_line


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
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(minutes=timeout_min))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup():
    """Tear the process group down at once (any exit path; no collective, so no wait on a dead peer)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def leave():
    """Leave the process group after a successful run: a barrier first, so no rank tears its connections
    down while a peer still uses them, then destroy it before the interpreter exits (gloo's threads must
    not outlive it)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _spawned(local_rank, main, args, world, port):
    env = dict(CAUSE_SPAWN_RANK=local_rank, CAUSE_SPAWN_WORLD=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ.update({name: str(value) for name, value in env.items()})
    try:
        main(args)
        leave()
    except REPORTED_ERRORS as err:
        # Only the exit code crosses the spawn boundary cleanly: report here, exit with its code there.
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(err.exit_code)
    finally:
        # On every way out: exiting with gloo still up can abort (SIGABRT) in finalisation, hiding the exit code.
        cleanup()


def launch(main, args):
    """Run ``main(args)`` once per process: directly under torchrun or for one id, spawned for several
    (on the CPU with gloo without CUDA or with ``--cpu``). If a spawned process fails, ``mp.spawn`` stops
    the others and raises, so the job exits non-zero instead of hanging (as torchrun does): a process
    that reported its own one-line error passes its exit code on; one killed or exiting without a report
    becomes a :class:`WorkerFailedError`; an exception that is a bug keeps its traceback.
    """
    world = len(parse_gpu_ids(args.gpu))
    if under_torchrun() or world <= 1:
        return main(args)
    # mp.spawn logs a warning for each sibling it terminates: keep the failing process's message the last line.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        mp.spawn(_spawned, args=(main, args, world, args.port), nprocs=world, join=True)
    except mp.ProcessExitedException as err:
        if err.signal_name is None and err.exit_code in EXIT_CODES and err.exit_code > 1:
            raise SpawnedExit(err.exit_code) from None
        how = f"was killed by {err.signal_name}" if err.signal_name else f"exited with code {err.exit_code}"
        then = "the other processes were stopped (a resumable state, if one was saved, continues with --resume auto)"
        raise WorkerFailedError(f"process {err.error_index} of {world} {how}; {then}") from None


def all_reduce_mean_grads(params, info):
    """Average the gradients of ``params`` over ranks in one flat all-reduce (what DDP does).

    Not DDP itself: the stages do not train one module's ``forward`` (stage 1 trains a bare codebook;
    stages 2-3 call the student head, projection head, probe and teacher separately, and the teacher
    takes no gradient), which DDP's reducer needs to track. Call it on the still-scaled AMP gradients,
    before ``GradScaler.unscale_``.
    """
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
