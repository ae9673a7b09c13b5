"""Several processes: AMP overflow handling across ranks."""

import socket

import torch
import torch.multiprocessing as mp

from tests.ddp_workers import OVERFLOW_STEP, overflow_worker


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_amp_overflow_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    mp.spawn(overflow_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = [step != OVERFLOW_STEP for step in range(4)]
    for state in ranks:
        assert state["stepped"] == expected and state["skipped"] == 1
        assert all(torch.isfinite(p).all() for p in state["params"])
    assert ranks[0]["scale"] == ranks[1]["scale"] == 2.0 ** 7
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
