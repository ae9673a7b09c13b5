"""The bad-input matrix (docs/bad_inputs.md): each bad input is one line and exit code 2, nothing half-written."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import crop_dataset
import fine_tuning
import test as test_stage
import train_front_door
import train_mediator
from engine import cli
from engine.build import build_cluster, build_segment
from engine.store import LOCK_NAME, ArtifactStore, OutputLockedError, RunLock, folder_dir_name, sidecar_path
from loader.images import list_images
from tests._backbone_fixtures import make_fake_checkpoint
from tests._stage_flags import flags, for_script, parse, store_of
from utils import atomic
from utils.crf import CRFPool
from utils.errors import InputNotFoundError

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--epoch", "1", "--max_steps", "1"]


def run_stage(script, argv, capsys):
    """``script``'s main through cli.run in this process -> (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as stop:
        cli.run(script.main, script.parser(), argv=for_script(script, list(argv)))
        raise SystemExit(0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return stop.value.code, [line for line in err.strip().splitlines() if not line.startswith("[")]


def stage_args(script, argv):
    args = parse(script, argv)
    args.n_classes, args.num_queries = 6, 64
    return args


def leftovers(root):
    return [p for p in Path(root).rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("content", [b"", b"hello, I am a text file\n", "truncated"])
def test_unreadable_backbone_checkpoint(tmp_path, toy_dirs, dino_ckpt, capsys, content):
    ckpt = tmp_path / "dino_tiny8.pth"
    ckpt.write_bytes(Path(dino_ckpt).read_bytes()[:5000] if content == "truncated" else content)
    code, lines = run_stage(train_mediator, flags(tmp_path / "out", str(ckpt), toy_dirs["train"]), capsys)
    assert code == 2 and lines[-1].startswith(f"error: {ckpt}: not a readable PyTorch checkpoint")


@pytest.mark.parametrize("kind", ["segment", "cluster"])
@pytest.mark.parametrize("content", [b"", b"some text\n", "truncated"])
def test_unreadable_segment_or_cluster(tmp_path, toy_dirs, dino_ckpt, capsys, kind, content):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["val"], "mlp", ["--crf", "no"])
    args, store = stage_args(test_stage, argv), store_of(test_stage, argv)
    store.save("codebook", np.zeros((16, 48), np.float32), {})
    store.save("segment", build_segment(args, 48).state_dict(), {})
    path = Path(store.path(kind))
    if kind == "cluster":
        store.save("cluster", build_cluster(args, 48).state_dict(), {})
    path.write_bytes(path.read_bytes()[:300] if content == "truncated" else content)
    code, lines = run_stage(test_stage, argv, capsys)
    script = "train_front_door.py" if kind == "segment" else "fine_tuning.py"
    assert code == 2 and lines[-1].startswith(f"error: {kind} weights {path}") and lines[-1].endswith(f"rerun {script}")


def test_disk_full_while_saving(tmp_path, toy_dirs, dino_ckpt, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", STEPS)
    real_write = atomic._write_file

    def full_disk(suffix):
        def write(path, data):
            if not path.split(".tmp")[0].endswith(suffix):
                return real_write(path, data)
            Path(path).write_bytes(b"")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return write

    for suffix in ("config_mediator.running.json", "modular.npy"):
        monkeypatch.setattr(atomic, "_write_file", full_disk(suffix))
        code, lines = run_stage(train_mediator, argv, capsys)
        target = Path(store_of(train_mediator, argv).output_dir("mediator")) / suffix
        assert code == 2 and lines[-1] == (
            f"error: cannot write {target}: No space left on device; nothing was written there"
        )
        assert not target.exists() and leftovers(out) == []
    assert not Path(sidecar_path(str(target))).exists()


def test_disk_full_while_logging_keeps_the_log_line_complete(tmp_path, toy_dirs, dino_ckpt, capsys, monkeypatch):
    import engine.loop

    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1", "--max_steps", "3"])
    real_open, writes = open, []

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, text):
            writes.append(text)
            if len(writes) == 2:  # the second record: half of it reaches the disk
                self.file.write(text[: len(text) // 2])
                self.file.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(text)

    def logging_open(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if str(path).endswith(".running.jsonl") and "a" in mode else file

    monkeypatch.setattr(engine.loop, "open", logging_open, raising=False)
    code, lines = run_stage(train_mediator, argv, capsys)
    log = Path(store_of(train_mediator, argv).output_dir("mediator")) / "mediator.running.jsonl"
    assert code == 2 and lines[-1].startswith(f"error: cannot write {log}: No space left on device;")
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1]


def test_sigint_during_a_save_leaves_the_previous_artifact(tmp_path, monkeypatch):
    store = ArtifactStore(str(tmp_path), "dino", 16, "mlp")
    path = store.path("segment")
    store.save("segment", {"w": torch.ones(3)}, {})
    before = Path(path).read_bytes(), Path(sidecar_path(path)).read_text()

    def interrupted(tmp, data):
        Path(tmp).write_bytes(data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.save("segment", {"w": torch.zeros(3)}, {})
    assert (Path(path).read_bytes(), Path(sidecar_path(path)).read_text()) == before
    assert leftovers(tmp_path) == []


SAVE_LOOP = """
import sys, torch
from engine.store import ArtifactStore
store = ArtifactStore(sys.argv[1], "dino", 16, "mlp")
print(store.path("segment"), flush=True)
for i in range(100000):
    store.save("segment", {"w": torch.full((1 << 20,), float(i))}, {"i": i})
"""


def test_sigkill_during_a_save_leaves_no_partial_artifact(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVE_LOOP, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        text=True,
    )
    path = Path(proc.stdout.readline().strip())
    deadline = time.time() + 30
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)
    time.sleep(0.7)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    state = torch.load(path, weights_only=True)  # complete, whichever save it is
    assert state["w"].shape == (1 << 20,) and bool((state["w"] == state["w"][0]).all())
    assert json.loads(Path(sidecar_path(str(path))).read_text())["kind"] == "segment"


def test_out_that_is_a_file(tmp_path, toy_dirs, dino_ckpt, capsys):
    out = tmp_path / "out"
    out.write_text("I am a file")
    code, lines = run_stage(train_mediator, flags(out, dino_ckpt, toy_dirs["train"]), capsys)
    assert code == 2 and lines[-1].startswith(f"error: --out {out} is a file, not a folder")


def test_n_classes_out_of_range_for_a_folder(tmp_path, toy_dirs, dino_ckpt, capsys):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"])
    argv[argv.index("--n_classes") + 1] = "256"
    code, lines = run_stage(train_mediator, argv, capsys)
    assert code == 2 and lines[-1] == (
        "error: --n_classes 256 is out of range for --dataset folder: use 1 to 255 "
        "(label PNGs hold class ids 0..254, 255 = ignore)"
    )


@pytest.mark.parametrize("resolution,grid,smallest", [(56, "yes", 64), (32, "yes", 64), (8, "no", 16)])
def test_geometry_that_cannot_work(tmp_path, toy_dirs, dino_ckpt, capsys, resolution, grid, smallest):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"], "mlp", ["--grid", grid], resolution=resolution)
    code, lines = run_stage(train_mediator, argv, capsys)
    assert code == 2 and lines[-1].startswith(f"error: --train_resolution {resolution} gives ")
    assert lines[-1].endswith(f"with patch 8 and --grid {grid}; use at least {smallest}")
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_check_lists_every_problem_and_trains_nothing(tmp_path, toy_dirs, dino_ckpt, capsys):
    out = tmp_path / "out"
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--check"], resolution=32)
    argv[argv.index("--n_classes") + 1] = "300"
    code, lines = run_stage(train_front_door, argv, capsys)
    assert code == 2 and len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "--n_classes 300" in lines[0] and "--train_resolution 32" in lines[1] and "train_mediator.py" in lines[2]
    code, _ = run_stage(train_mediator, flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--check"]), capsys)
    assert code == 0 and not out.exists()


def test_dataset_problems_are_found_by_the_check(tmp_path, dino_ckpt, capsys):
    from PIL import Image

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for i in range(12):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(images / f"{i:02d}.jpg")
        Image.fromarray(np.full((32, 32), i % 6, np.uint8)).save(labels / f"{i:02d}.png")
    (images / "00.jpg").write_bytes((images / "00.jpg").read_bytes()[:100])  # truncated JPEG
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(labels / "11.png")  # class 9 of 6
    code, lines = run_stage(
        train_mediator, flags(tmp_path / "out", dino_ckpt, (images, labels), "mlp", ["--check"]), capsys
    )
    assert code == 2 and len(lines) == 2
    assert lines[0].startswith(f"error: cannot read image {images / '00.jpg'}")
    assert lines[1].startswith(f"error: label file {labels / '11.png'} holds values outside the dataset's range: 9")


def trained_codebook_and_segment(tmp_path, toy_dirs, dino_ckpt):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"], "mlp", STEPS)
    train_mediator.main(parse(train_mediator, argv))
    train_front_door.main(parse(train_front_door, argv))
    return argv, stage_args(fine_tuning, argv), store_of(fine_tuning, argv)


def test_artifacts_that_do_not_match_are_refused(tmp_path, toy_dirs, dino_ckpt, capsys):
    argv, args, store = trained_codebook_and_segment(tmp_path, toy_dirs, dino_ckpt)
    record = json.loads(Path(sidecar_path(store.path("segment"))).read_text())
    assert {k: record["dataset"][k] for k in ("name", "image_dir", "files")} == {
        "name": "folder",
        "image_dir": str(toy_dirs["train"][0]),
        "files": 32,
    }
    assert len(record["dataset"]["manifest"]) == 64  # the sha256 of the training files' paths, sizes and times
    assert record["upstream"]["kind"] == "codebook" and record["backbone"]["size"] == os.path.getsize(dino_ckpt)
    assert set(torch.load(store.path("segment"), weights_only=True)) == set(build_segment(args, 48).state_dict())

    # Stage 1 rerun: the stage-2 head no longer belongs to the codebook.
    codebook_record = json.loads(Path(sidecar_path(store.path("codebook"))).read_text())
    store.identity = {k: codebook_record[k] for k in ("dataset", "backbone")}
    store.save("codebook", np.load(store.path("codebook")) + 1, codebook_record["flags"])
    code, lines = run_stage(fine_tuning, argv + ["--check"], capsys)
    assert code == 2 and lines[-1].startswith("error: segment_mlp.pth was trained on codebook sha ")
    assert lines[-1].endswith("rerun train_front_door.py") and "modular.npy is now sha" in lines[-1]

    # A released head without provenance record: accepted with a warning.
    os.remove(sidecar_path(store.path("segment")))
    with pytest.raises(SystemExit) as stop:
        cli.run(fine_tuning.main, fine_tuning.parser(), argv=for_script(fine_tuning, argv + ["--check"]))
    err = capsys.readouterr().err
    assert stop.value.code == 0 and "warning: segment_mlp.pth has no provenance record" in err

    # Another checkpoint under the same file name: the codebook is refused.
    other = make_fake_checkpoint(
        tmp_path / "elsewhere" / "dino_tiny8.pth", "dino", embed_dim=48, depth=2, patch_size=8, img_size=64, seed=5
    )
    moved = list(argv)
    moved[moved.index("--ckpt") + 1] = str(other)
    code, lines = run_stage(train_front_door, moved + ["--check"], capsys)
    assert code == 2 and lines[-1].startswith(f"error: modular.npy was trained with backbone {dino_ckpt}")


def test_wrong_head_and_codebook_width(tmp_path, toy_dirs, dino_ckpt, capsys):
    argv, args, store = trained_codebook_and_segment(tmp_path, toy_dirs, dino_ckpt)
    tr = list(argv)
    tr[tr.index("--head") + 1] = "tr"
    code, lines = run_stage(fine_tuning, tr + ["--check"], capsys)
    assert code == 2 and "did you mean --head mlp?" in lines[-1]
    store.save("codebook", np.zeros((16, 32), np.float32), {})
    code, lines = run_stage(train_front_door, argv + ["--check"], capsys)
    assert code == 2 and lines[-1] == (
        f"error: codebook {store.path('codebook')} is [16, 32] but this run needs "
        f"[16, 48] (--num_codebook, backbone width): rerun train_mediator.py "
        f"--overwrite"
    )


def test_folder_runs_get_their_own_artifact_directory(tmp_path):
    names = {folder_dir_name(str(tmp_path / d / "images")) for d in ("a", "b")}
    assert len(names) == 2 and all(n.startswith("folder-images-") for n in names)


def test_a_second_run_on_the_same_output_is_refused(tmp_path, toy_dirs, dino_ckpt, capsys):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"], "mlp", STEPS)
    directory = store_of(train_mediator, argv).output_dir("mediator")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        Path(directory).mkdir(parents=True)
        with RunLock(directory):
            lock = json.loads((Path(directory) / LOCK_NAME).read_text())
        lock["pid"] = holder.pid
        (Path(directory) / LOCK_NAME).write_text(json.dumps(lock))
        code, lines = run_stage(train_mediator, argv, capsys)
        assert code == 2 and lines[-1].startswith(f"error: {directory} is in use by another run: pid {holder.pid} on ")
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is taken over with a warning, and released at the end.
    cli.run(train_mediator.main, train_mediator.parser(), argv=for_script(train_mediator, argv))
    assert (
        f"taking over the stale lock {directory}/{LOCK_NAME} of a run that is gone (pid {holder.pid}"
        in capsys.readouterr().err
    )
    assert (
        not (Path(directory) / LOCK_NAME).exists() and Path(store_of(train_mediator, argv).path("codebook")).is_file()
    )


def test_ctrl_c_in_test_py_is_one_line(tmp_path, toy_dirs, dino_ckpt, capsys, monkeypatch):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["val"], "mlp", ["--crf", "no", "--baseline", "none"])
    args, store = stage_args(test_stage, argv), store_of(test_stage, argv)
    store.save("codebook", np.zeros((16, 48), np.float32), {})
    store.save("segment", build_segment(args, 48).state_dict(), {})
    store.save("cluster", build_cluster(args, 48).state_dict(), {})

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(test_stage, "evaluate", interrupted)
    code, lines = run_stage(test_stage, argv, capsys)
    assert code == 130 and lines == ["interrupted: no partial artifact was written"]
    run = Path(store.run_dir)
    assert not (run / "metrics.json").exists() and not (run / LOCK_NAME).exists()


def test_crf_workers_ignore_ctrl_c():
    images = np.zeros((2, 16, 16, 3), np.uint8)
    logits = torch.randn(2, 3, 16, 16)
    with CRFPool(num_workers=1) as pool:
        first = pool(images, logits)
        (worker,) = pool._pool._pool
        os.kill(worker.pid, signal.SIGINT)
        time.sleep(0.5)
        assert worker.is_alive()
        torch.testing.assert_close(pool(images, logits), first)


def test_ctrl_c_in_crop_dataset_is_one_line(monkeypatch, capsys):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(crop_dataset, "crop_dataset", interrupted)
    with pytest.raises(SystemExit) as stop:
        crop_dataset.main(["--dataset", "cocostuff27", "--data_dir", "/nowhere"])
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "crop_dataset.py: interrupted; the crops written so far are complete, rerun the same command to finish"
    ]


def test_crop_workers_ignore_ctrl_c():
    from multiprocessing import get_context

    with get_context("fork").Pool(1, initializer=crop_dataset.ignore_sigint) as pool:
        pid = pool.apply(os.getpid)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.3)
        assert pool.apply(os.getpid) == pid


def test_empty_folder_and_label_of_the_wrong_size(tmp_path, dino_ckpt, capsys):
    from PIL import Image

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    code, lines = run_stage(
        train_mediator, flags(tmp_path / "out", dino_ckpt, (images, labels), "mlp", ["--check"]), capsys
    )
    assert code == 2 and lines[-1].startswith("error: no images (") and str(images) in lines[-1]
    for i in range(4):
        Image.new("RGB", (32, 32)).save(images / f"{i}.png")
        Image.fromarray(np.zeros((16 if i == 3 else 32, 32), np.uint8)).save(labels / f"{i}.png")
    code, lines = run_stage(
        train_mediator, flags(tmp_path / "out", dino_ckpt, (images, labels), "mlp", ["--check"]), capsys
    )
    assert code == 2 and lines == [
        f"error: label file {labels / '3.png'} is 32x16 but its image {images / '3.png'} is 32x32"
    ]


def test_a_folder_whose_images_changed_refuses_its_old_codebook(tmp_path, toy_dirs, dino_ckpt, capsys):
    """A --dataset folder is known by its files (paths, sizes, times), not by its path alone."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(toy_dirs["train"][0], images)
    shutil.copytree(toy_dirs["train"][1], labels)
    argv = flags(tmp_path / "out", dino_ckpt, (images, labels), "mlp", STEPS)
    train_mediator.main(parse(train_mediator, argv))
    code, _ = run_stage(train_front_door, argv + ["--check"], capsys)
    assert code == 0
    first = sorted(images.iterdir())[0]
    Image.fromarray(np.full((96, 96, 3), 7, np.uint8)).save(first)  # same name, another picture
    code, lines = run_stage(train_front_door, argv + ["--check"], capsys)
    assert code == 2 and lines[-1].startswith(
        f"error: modular.npy was trained on dataset folder in {images} (manifest "
    )
    assert lines[-1].endswith("rerun train_mediator.py")


def test_a_lock_left_on_another_host_is_taken_over_once_its_heartbeat_is_old(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    lock = {"pid": 1, "host": "node-17", "started": "2026-01-01 00:00:00", "command": "train_front_door.py"}
    (directory / LOCK_NAME).write_text(json.dumps({**lock, "heartbeat": time.time()}))
    with pytest.raises(OutputLockedError, match="is in use by another run: pid 1 on node-17"):
        RunLock(str(directory), stale_after=60).acquire()  # a live run elsewhere: its heartbeat is recent
    (directory / LOCK_NAME).write_text(json.dumps({**lock, "heartbeat": time.time() - 61}))
    with pytest.warns(
        UserWarning, match=r"the stale lock .* of a run silent for 1.0 min \(--lock_timeout 1\) \(pid 1 on node-17"
    ):
        held = RunLock(str(directory), stale_after=60).acquire()
    assert json.loads((directory / LOCK_NAME).read_text())["pid"] == os.getpid()
    held.release()
    assert not (directory / LOCK_NAME).exists()


def test_the_lock_heartbeat_advances_while_the_run_lives(tmp_path):
    with RunLock(str(tmp_path), stale_after=0.2):
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        deadline = time.time() + 10
        while json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.02)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first


def test_gpu_ids_on_a_machine_without_cuda_are_a_warning(tmp_path, toy_dirs, dino_ckpt, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"])
    argv = [a for a in argv if a != "--cpu"]
    argv[argv.index("--gpu") + 1] = "7"
    code, _ = run_stage(train_mediator, argv + ["--check"], capsys)
    assert code == 0
    with pytest.raises(SystemExit):
        cli.run(train_mediator.main, train_mediator.parser(), argv=for_script(train_mediator, argv + ["--check"]))
    assert "warning: no CUDA device on this machine: --gpu 7 runs on the CPU" in capsys.readouterr().err


def test_broken_links_in_an_image_folder_are_warned_and_left_out(tmp_path, toy_dirs, dino_ckpt, capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    shutil.copytree(toy_dirs["train"][0], images)
    shutil.copytree(toy_dirs["train"][1], labels)
    (images / "zz_dangling.png").symlink_to(tmp_path / "nowhere.png")
    (images / "zz_loop.png").symlink_to(images / "zz_loop.png")
    argv = flags(tmp_path / "out", dino_ckpt, (images, labels), "mlp", STEPS)
    with pytest.raises(SystemExit) as stop:
        cli.run(train_mediator.main, train_mediator.parser(), argv=for_script(train_mediator, argv + ["--check"]))
    out, err = capsys.readouterr()
    assert stop.value.code == 0 and f"warning: 2 broken link(s) in {images} left out" in err
    assert "  train: 16 images" in out
    # predict.py on a folder of nothing but broken links says so
    only = tmp_path / "only_links"
    only.mkdir()
    (only / "a.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.warns(UserWarning, match="1 broken link"), pytest.raises(InputNotFoundError, match="but broken links"):
        list_images(str(only))


def test_temporaries_of_a_killed_save_are_removed_by_the_next_run(tmp_path, toy_dirs, dino_ckpt):
    argv = flags(tmp_path / "out", dino_ckpt, toy_dirs["train"], "mlp", STEPS)
    directory = Path(store_of(train_mediator, argv).output_dir("mediator"))
    directory.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = directory / f"modular.npy{atomic.TMP_SUFFIX}{dead.pid}"
    alive = directory / f"notes.txt{atomic.TMP_SUFFIX}{os.getpid()}"  # a live writer's: kept
    stale.write_bytes(b"half")
    alive.write_bytes(b"busy")
    train_mediator.main(parse(train_mediator, argv))
    assert not stale.exists() and alive.exists() and (directory / "modular.npy").is_file()


def test_ctrl_c_of_run_sh_exits_130(tmp_path, toy_dirs, dino_ckpt):
    images, labels = toy_dirs["train"]
    env = {
        "dataset": "folder",
        "ckpt": dino_ckpt,
        "out": str(tmp_path / "out"),
        "extra": f"--image_dir {images} --label_dir {labels} --n_classes 6 --num_codebook 16 --num_workers 0 --cpu",
        "train_flags": "--epoch 1000",
    }
    proc = subprocess.Popen(
        ["bash", "run.sh"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,
        # SIGINT at its default, as in a terminal: a shell ignores it in background jobs, and children inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    log = Path(store_of(train_mediator, flags(tmp_path / "out", dino_ckpt, toy_dirs["train"])).output_dir("mediator"))
    deadline = time.time() + 120
    while time.time() < deadline and not (log / "mediator.running.jsonl").is_file():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith("run.sh: interrupted in stage 1")
