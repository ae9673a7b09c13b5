"""Functions run in spawned gloo processes by tests/test_distributed.py (importable by name)."""

import atexit
import os
from pathlib import Path

import torch
import torch.distributed as dist

from engine.loop import Trainer
from utils.distributed import all_reduce_mean, leave, setup

OVERFLOW_STEP = 1
OVERFLOW_RANK = 1


def overflow_worker(rank, world, port, out_dir):
    """Four AMP-scaled optimiser steps of a linear layer; rank 1's loss overflows on step 1.

    Writes ``rank<r>.pt`` with the final parameters, the loss scale and which steps were taken.
    """
    os.environ.update(
        CAUSE_SPAWN_RANK=str(rank), CAUSE_SPAWN_WORLD=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info = setup("0", use_cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    stage = Trainer("overflow", info, out_dir, epochs=1, max_steps=None, save_every=0, amp=False, flags={}, shared={})
    # A CPU loss scaler stands in for the CUDA one: the skip logic is the same.
    stage.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    data = torch.Generator().manual_seed(rank + 1)
    stepped = []
    for step in range(4):
        loss = model(torch.randn(5, 4, generator=data)).pow(2).mean()
        if step == OVERFLOW_STEP and rank == OVERFLOW_RANK:
            loss = loss * float("inf")
        stepped.append(stage.step(loss, [optimizer], list(model.parameters())))
    torch.save(
        {
            "params": [p.detach().clone() for p in model.parameters()],
            "scale": stage.scaler.get_scale(),
            "stepped": stepped,
            "skipped": stage.skipped_steps,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    leave()


def teardown_main(args):
    """A stage ``main`` for ``launch``: one all-reduce, then records at interpreter exit whether the
    process group was still up (``rank<r>.txt``)."""
    info = setup(args.gpu, use_cpu=True)
    total = all_reduce_mean(float(info.rank), info)
    path = os.path.join(args.out, f"rank{info.rank}.txt")
    atexit.register(lambda: Path(path).write_text(f"{float(total)} {dist.is_initialized()}"))


def initial_weights_worker(rank, world, port, out_dir):
    """Each rank draws its own random initialisation; after the Trainer is built, all hold rank 0's."""
    os.environ.update(
        CAUSE_SPAWN_RANK=str(rank), CAUSE_SPAWN_WORLD=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info = setup("0", use_cpu=True)
    torch.manual_seed(rank)
    model, codebook = torch.nn.Linear(4, 3), torch.nn.Parameter(torch.randn(5, 2))
    before = [p.detach().clone() for p in (*model.parameters(), codebook)]
    Trainer(
        "init",
        info,
        out_dir,
        epochs=1,
        max_steps=None,
        save_every=0,
        amp=False,
        flags={},
        shared={"model": model, "codebook": codebook},
    )
    after = [p.detach().clone() for p in (*model.parameters(), codebook)]
    torch.save({"before": before, "after": after}, os.path.join(out_dir, f"init{rank}.pt"))
    leave()
