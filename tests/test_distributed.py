"""Several processes: AMP overflow handling across ranks."""

import argparse
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.ddp_workers import OVERFLOW_STEP, initial_weights_worker, overflow_worker, teardown_main
from utils.distributed import _spawned, launch
from utils.errors import InputNotFoundError


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
    assert ranks[0]["scale"] == ranks[1]["scale"] == 2.0**7
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_every_rank_starts_from_rank_0s_initial_weights(tmp_path):
    mp.spawn(initial_weights_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"init{r}.pt", weights_only=True) for r in range(2)]
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0]["before"], ranks[1]["before"]))
    for rank in ranks:
        assert all(torch.equal(a, b) for a, b in zip(rank["after"], ranks[0]["before"]))


def test_spawned_processes_leave_the_process_group_before_exiting(tmp_path):
    launch(teardown_main, argparse.Namespace(gpu="0,1", port=free_port(), out=str(tmp_path)))
    # Both ranks saw the mean rank 0.5, and neither exited with its process group still up.
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["0.5 False"] * 2


@pytest.mark.parametrize("error", [None, InputNotFoundError, ZeroDivisionError])
def test_a_spawned_process_takes_its_process_group_down_on_every_way_out(monkeypatch, capsys, error):
    # A process exiting with gloo still up can abort (SIGABRT) in the interpreter's finalisation,
    # which turned a bad-input exit code 2 into "killed by SIGABRT" in about 1 run of 10.
    for name in ("CAUSE_SPAWN_RANK", "CAUSE_SPAWN_WORLD", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # _spawned sets them; restored after the test
    port = free_port()

    def main(args):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        if error is not None:
            raise error("stopped")

    if error is None:
        _spawned(0, main, None, 1, port)
    else:
        with pytest.raises(SystemExit if error is InputNotFoundError else error) as stopped:
            _spawned(0, main, None, 1, port)
        if error is InputNotFoundError:
            assert stopped.value.code == 2 and capsys.readouterr().err == "error: stopped\n"
    assert not dist.is_initialized()
