"""Resumable training: interrupted and resumed stages, non-finite guards, a killed rank."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import fine_tuning
import train_front_door
import train_mediator
from engine import cli
from engine.loop import Trainer, step_schedules
from tests._stage_flags import dataset_dir, flags, for_script, parse
from utils.distributed import setup
from utils.errors import NonFiniteLossError, WorkerFailedError

ROOT = Path(__file__).resolve().parents[1]


def artifacts(out, toy_dirs):
    """The artifact folder of the toy runs below (one per training image folder)."""
    return dataset_dir(out, toy_dirs["train"][0]) / "dino_tiny8" / "16"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def tensors_equal(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start(script, argv):
    # The same intra-op thread count as this process, so that CPU results are bit-identical.
    # SIGINT back to its default: a shell ignores it in background jobs, and Python would inherit that.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(
        [sys.executable, script, *for_script(script, argv)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for_steps(proc, log, state, steps, timeout=120):
    """Block until ``log`` has ``steps`` records and ``state`` exists (the process must still run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and log.read_text().count("\n") >= steps and state.is_file():
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError(f"{log} did not reach {steps} records")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy_dirs, dino_ckpt):
    """An output root with a stage-1 codebook and a short stage-2 segment."""
    out = tmp_path_factory.mktemp("resume") / "CAUSE"
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1", "--max_steps", "2"])
    train_mediator.main(parse(train_mediator, argv))
    train_front_door.main(parse(train_front_door, argv))
    return out


def copy_of(trained, tmp_path):
    out = tmp_path / "CAUSE"
    shutil.copytree(trained, out)
    return out


def test_sigkilled_stage2_resumes_to_the_uninterrupted_artifact(tmp_path, trained, toy_dirs, dino_ckpt, capsys):
    out = copy_of(trained, tmp_path)
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "6", "--save_every", "1"])
    run, segment = artifacts(out, toy_dirs) / "mlp", artifacts(out, toy_dirs) / "segment_mlp.pth"
    train_front_door.main(parse(train_front_door, argv))
    reference, reference_log = segment.read_bytes(), (run / "front_door.jsonl").read_text()
    shutil.copy(segment, tmp_path / "segment_ref.pth")

    proc = start("train_front_door.py", argv)
    wait_for_steps(proc, run / "front_door.running.jsonl", run / "state_front_door.pt", 3)
    proc.kill()
    proc.communicate(timeout=60)
    # The killed rerun left the previous complete artifact and log as they were, and a state to resume from.
    assert segment.read_bytes() == reference and (run / "front_door.jsonl").read_text() == reference_log
    assert (run / "state_front_door.pt").is_file()

    capsys.readouterr()
    train_front_door.main(parse(train_front_door, argv + ["--resume", "auto"]))
    assert "resuming from" in capsys.readouterr().err
    assert tensors_equal(segment, tmp_path / "segment_ref.pth")
    assert (run / "front_door.jsonl").read_text() == reference_log
    assert not list(run.glob("state_*"))


def test_interrupted_stage3_keeps_the_old_artifacts_and_resumes(tmp_path, trained, toy_dirs, dino_ckpt):
    out = copy_of(trained, tmp_path)
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "5", "--save_every", "2"])
    run, segment, cluster = (
        artifacts(out, toy_dirs) / "mlp",
        artifacts(out, toy_dirs) / "segment_mlp.pth",
        artifacts(out, toy_dirs) / "cluster_mlp.pth",
    )
    stage2 = segment.read_bytes()
    fine_tuning.main(parse(fine_tuning, argv))
    shutil.copy(segment, tmp_path / "segment_ref.pth")
    shutil.copy(cluster, tmp_path / "cluster_ref.pth")
    segment.write_bytes(stage2)  # stage 3 starts from the stage-2 segment again
    before = cluster.read_bytes()

    proc = start("fine_tuning.py", argv)
    wait_for_steps(proc, run / "fine_tuning.running.jsonl", run / "state_fine_tuning.pt", 3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert last.startswith("interrupted: no partial artifact was written; resumable state ")
    assert str(run / "state_fine_tuning.pt") in last and "--resume auto" in last
    assert segment.read_bytes() == stage2 and cluster.read_bytes() == before

    fine_tuning.main(parse(fine_tuning, argv + ["--resume", "yes"]))
    assert tensors_equal(segment, tmp_path / "segment_ref.pth")
    assert tensors_equal(cluster, tmp_path / "cluster_ref.pth")
    assert not list(run.glob("state_*"))


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_state(
    tmp_path, trained, toy_dirs, dino_ckpt, capsys, monkeypatch
):
    out = copy_of(trained, tmp_path)
    os.remove(artifacts(out, toy_dirs) / "segment_mlp.pth")
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "2", "--save_every", "1"])
    state_path = artifacts(out, toy_dirs) / "mlp" / "state_front_door.pt"
    real_step, calls, good = train_front_door.front_door_step, [], []

    def poisoned(*args, **kwargs):
        out_ = real_step(*args, **kwargs)
        calls.append(args[4] is not None)  # the fixed-batch loss of the summary runs without the bank
        if sum(calls) == 4 and calls[-1]:
            good.append(state_path.read_bytes())
            out_["loss_front"] = out_["loss_front"] * float("nan")
            out_["loss"] = out_["loss_front"] + out_["loss_linear"]
        return out_

    monkeypatch.setattr(train_front_door, "front_door_step", poisoned)
    with pytest.raises(SystemExit) as stop:
        cli.run(train_front_door.main, train_front_door.parser(), for_script(train_front_door, argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == NonFiniteLossError.exit_code == 3 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: [front_door] non-finite loss at step 4: loss_front=nan loss_linear=")
    assert err[-1].endswith(f"last good state: {state_path} (step 3)")
    assert state_path.read_bytes() == good[0]
    saved = torch.load(state_path, weights_only=True)
    assert saved["loop"]["global_step"] == 3
    assert not (artifacts(out, toy_dirs) / "segment_mlp.pth").exists()

    # The state is only resumed with the flags it was saved with, and --resume yes needs one.
    monkeypatch.setattr(train_front_door, "front_door_step", real_step)
    with pytest.raises(SystemExit) as stop:
        cli.run(
            train_front_door.main,
            train_front_door.parser(),
            for_script(train_front_door, argv + ["--resume", "auto", "--lr", "0.01"]),
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "--lr 0.001 -> 0.01" in err[-1] and "--resume no" in err[-1]
    other = flags(tmp_path / "other", dino_ckpt, toy_dirs["train"], "mlp", ["--resume", "yes"])
    with pytest.raises(SystemExit) as stop:
        cli.run(train_mediator.main, train_mediator.parser(), for_script(train_mediator, other))
    assert stop.value.code == 2 and "no resumable state" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_state_with_non_finite_parameters_is_never_saved(tmp_path):
    model = torch.nn.Linear(3, 2)
    trainer = Trainer(
        "toy",
        setup("0", use_cpu=True),
        str(tmp_path),
        epochs=1,
        max_steps=None,
        save_every=1,
        amp=False,
        flags={},
        shared={"model": model},
    )
    trainer.save_state()
    saved = (tmp_path / "state_toy.pt").read_bytes()
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite parameters.*last good state: .*state_toy.pt"):
        trainer.save_state()
    assert (tmp_path / "state_toy.pt").read_bytes() == saved


def spawned_workers(parent):
    """PIDs of the processes ``mp.spawn`` started under ``parent`` (not its resource tracker)."""
    found = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]


def test_a_killed_rank_stops_the_job_and_resume_completes_it(tmp_path, trained, toy_dirs, dino_ckpt):
    out = copy_of(trained, tmp_path)
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "5", "--save_every", "1", "--port", free_port()])
    argv[argv.index("--gpu") + 1] = "0,1"
    run = artifacts(out, toy_dirs) / "mlp"
    proc = start("train_front_door.py", argv)
    wait_for_steps(proc, run / "front_door.running.jsonl", run / "state_front_door.pt", 2)
    workers = spawned_workers(proc.pid)
    assert len(workers) == 2
    killed = time.time()
    os.kill(max(workers), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - killed < 60
    # (after the killed rank's unfinished progress bar; a warning of multiprocessing's resource tracker about
    # the dead process's semaphores may follow)
    assert proc.returncode == WorkerFailedError.exit_code == 5 and "Traceback" not in stderr
    assert re.search(r"error: process \d of 2 was killed by SIGKILL; the other processes were stopped", stderr)

    argv[argv.index("--port") + 1] = free_port()
    proc = start("train_front_door.py", argv + ["--resume", "auto"])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "resuming from" in stderr and not list(run.glob("state_*"))
    records = (run / "front_door.jsonl").read_text().splitlines()
    assert len(records) == 5 * 2


def test_a_resumed_schedule_steps_without_the_order_warning_and_keeps_its_values():
    def resumed_schedule():
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        scheduler.load_state_dict({**scheduler.state_dict(), "_step_count": 1})
        return optimizer, scheduler

    optimizer, scheduler = resumed_schedule()
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        scheduler.step()  # what torch says of a bare step in the new process
    optimizer, scheduler = resumed_schedule()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step_schedules([scheduler])
    assert optimizer.param_groups[0]["lr"] == 0.5


@pytest.mark.parametrize("gpus", ["0", "0,1"])
def test_sigterm_saves_the_state_releases_the_lock_and_resumes(tmp_path, trained, toy_dirs, dino_ckpt, gpus):
    """A cluster's pre-emption: SIGTERM to the launched process (passed on to spawned ones) stops every rank at
    the same step with its state saved, exit 143; --resume auto ends where an uninterrupted run ends, and
    refuses the state once the codebook it was trained on has changed."""
    out = copy_of(trained, tmp_path)
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "3", "--save_every", "0", "--port", free_port()])
    argv[argv.index("--gpu") + 1] = gpus
    run, segment = artifacts(out, toy_dirs) / "mlp", artifacts(out, toy_dirs) / "segment_mlp.pth"
    if gpus == "0":
        train_front_door.main(parse(train_front_door, argv))
        shutil.copy(segment, tmp_path / "segment_ref.pth")
        reference_log = (run / "front_door.jsonl").read_text()
    segment.unlink()

    proc = start("train_front_door.py", argv)
    log = run / "front_door.running.jsonl"
    wait_for_steps(proc, log, run / "config_front_door.running.json", 3 if gpus == "0" else 1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("terminated (SIGTERM)") and "rerun with --resume auto" in last and "Traceback" not in stderr
    steps = log.read_text().count("\n")
    state = torch.load(run / "state_front_door.pt", weights_only=False)
    assert state["loop"]["global_step"] == steps  # saved at the step SIGTERM stopped, not at an epoch end
    assert not (run / "run.lock").exists() and not segment.exists()

    if gpus == "0":  # a codebook rerun since: the state is refused; with the codebook restored, it resumes
        codebook = artifacts(out, toy_dirs).parents[1] / "modularity" / "dino_tiny8" / "16" / "modular.npy"
        kept = {path: path.read_bytes() for path in (codebook, Path(f"{codebook}.json"))}
        train_mediator.main(parse(train_mediator, argv + ["--overwrite", "--seed", "7"]))
        proc = start("train_front_door.py", argv + ["--resume", "auto"])
        _, stderr = proc.communicate(timeout=300)
        last = stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and "was trained on another upstream" in last, stderr[-2000:]
        assert last.endswith("rerun without --resume, or restore the upstream it was trained on")
        for path, data in kept.items():
            path.write_bytes(data)
    argv[argv.index("--port") + 1] = free_port()
    proc = start("train_front_door.py", argv + ["--resume", "auto"])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "resuming from" in stderr, stderr[-2000:]
    assert not list(run.glob("state_*")) and not (run / "run.lock").exists()
    if gpus == "0":
        assert tensors_equal(segment, tmp_path / "segment_ref.pth")
        assert (run / "front_door.jsonl").read_text() == reference_log
    else:
        assert len((run / "front_door.jsonl").read_text().splitlines()) == 3 * 2
