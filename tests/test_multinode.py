"""torchrun across machines (two nodes on one machine, loopback only) and an elastic restart after a killed worker."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests._stage_flags import dataset_dir, flags, for_script

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("train_mediator.py", "train_front_door.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(*options):
    return [sys.executable, "-m", "torch.distributed.run", *options]


def environment():
    # One intra-op thread per process, as the spawned reference run gets: CPU results are then bit-identical.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def succeeds(command):
    """Run ``command`` from the repository root (5 minutes at most) and check that it exits 0."""
    res = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment())
    assert res.returncode == 0, res.stderr[-2000:]


def artifacts(out, toy_dirs):
    root = dataset_dir(out, toy_dirs["train"][0])
    return {
        "codebook": root / "modularity" / "dino_tiny8" / "16" / "modular.npy",
        "segment": root / "dino_tiny8" / "16" / "segment_mlp.pth",
    }


def same_tensors(a, b):
    if a.suffix == ".npy":
        return a.read_bytes() == b.read_bytes()
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_nodes_train_as_the_two_process_run(tmp_path, toy_dirs, dino_ckpt):
    """Two torchrun agents (--nnodes 2, c10d rendezvous on 127.0.0.1) end with the artifacts of --gpu 0,1, whose
    ranks draw the same data and grid picks; only rank 0 writes artifacts and logs."""
    spawned, nodes = tmp_path / "spawned", tmp_path / "nodes"
    for script in STAGES:
        argv = for_script(script, flags(spawned, dino_ckpt, toy_dirs["train"], "mlp", ["--max_steps", "3"]))
        gpus = argv.index("--gpu") + 1
        succeeds([sys.executable, script, *argv[:gpus], "0,1", *argv[gpus + 1 :], "--port", free_port()])
        argv = for_script(script, flags(nodes, dino_ckpt, toy_dirs["train"], "mlp", ["--max_steps", "3"]))
        rendezvous = [
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_id",
            "cause",
            "--rdzv_endpoint",
            f"127.0.0.1:{free_port()}",
        ]
        agents = [
            subprocess.Popen(
                torchrun(*rendezvous, "--node_rank", str(n), script, *argv),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment(),
            )
            for n in range(2)
        ]
        for agent in agents:
            _, stderr = agent.communicate(timeout=300)
            assert agent.returncode == 0, stderr[-2000:]
    mine, theirs = artifacts(nodes, toy_dirs), artifacts(spawned, toy_dirs)
    for kind in mine:
        assert same_tensors(mine[kind], theirs[kind]), kind
    config = (mine["segment"].parent / "mlp" / "config_front_door.json").read_text()
    assert '"world_size": 2' in config
    written = sorted(p.name for p in mine["segment"].parent.iterdir())
    assert written == ["mlp", "segment_mlp.pth", "segment_mlp.pth.json"]


def test_an_elastic_restart_resumes_to_the_uninterrupted_artifact(tmp_path, toy_dirs, dino_ckpt):
    """torchrun --max-restarts 1: a worker killed mid-stage, the group restarted, --resume auto continues from the
    last state; the command exits 0 with the artifact of an uninterrupted run (bit-identical on the CPU)."""
    trained = tmp_path / "reference"
    base = flags(trained, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "3", "--save_every", "1"])
    job = ["--standalone", "--nproc_per_node", "2", "--max-restarts", "1"]
    for script in STAGES:
        succeeds(torchrun(*job, script, *for_script(script, base)))
    out = tmp_path / "elastic"
    argv = for_script(
        "train_front_door.py",
        flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "3", "--save_every", "1", "--resume", "auto"]),
    )
    codebook, target = artifacts(trained, toy_dirs)["codebook"], artifacts(out, toy_dirs)["codebook"]
    target.parent.mkdir(parents=True)
    shutil.copy(codebook, target)
    shutil.copy(f"{codebook}.json", f"{target}.json")
    agent = subprocess.Popen(
        torchrun(*job, "train_front_door.py", *argv),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(),
    )
    run_dir = artifacts(out, toy_dirs)["segment"].parent / "mlp"
    deadline = time.time() + 180
    while time.time() < deadline and not (run_dir / "front_door.running.jsonl").is_file():
        time.sleep(0.1)
    while time.time() < deadline and (run_dir / "front_door.running.jsonl").read_text().count("\n") < 3:
        time.sleep(0.05)
    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(max(workers, key=int)), signal.SIGKILL)
    _, stderr = agent.communicate(timeout=300)
    assert agent.returncode == 0, stderr[-3000:]
    assert "resuming from" in stderr
    assert same_tensors(artifacts(out, toy_dirs)["segment"], artifacts(trained, toy_dirs)["segment"])
    assert not list(run_dir.glob("state_*"))


JOIN = """
import sys, time
import torch, torch.distributed as dist
from utils.distributed import setup
time.sleep(float(sys.argv[1]))
info = setup(timeout_min=0.25)
value = torch.ones(1)
dist.all_reduce(value)
print(int(value.item()))
dist.destroy_process_group()
"""


def test_a_restarted_group_does_not_read_its_predecessors_addresses(tmp_path):
    """torchrun keeps one store across --max-restarts: a restarted rank 1 that asks for rank 0's address before the
    new rank 0 has written it must not get the dead rank 0's (the connection would be refused until the timeout)."""
    port = free_port()
    store = torch.distributed.TCPStore("127.0.0.1", int(port), is_master=True, wait_for_workers=False)
    for attempt, delays in enumerate([(0, 0), (3, 0)]):  # attempt 1: rank 0 comes up 3 s after rank 1
        env = {**environment(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
        env |= {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": str(attempt)}
        ranks = [
            subprocess.Popen(
                [sys.executable, "-c", JOIN, str(delay)],
                cwd=ROOT,
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank, delay in enumerate(delays)
        ]
        for rank in ranks:
            out, err = rank.communicate(timeout=120)
            assert rank.returncode == 0 and out.strip() == "2", err[-2000:]
    del store
