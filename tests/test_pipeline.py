"""End-to-end checks of the four stage scripts on tiny backbones and generated data."""

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fine_tuning
import predict
import test as test_stage
import train_front_door
import train_mediator
from engine.cli import artifact_store
from models.normalisation import NORMALISATIONS
from tests._backbone_fixtures import make_dinov3_timm, make_fake_checkpoint, timm_dinov3_to_meta
from tests._stage_flags import dataset_dir, flags, for_script, parse
from utils import atomic
from utils.atomic import atomic_np_save, atomic_torch_save

ROOT = Path(__file__).resolve().parents[1]


def summary(out, stage, head=None):
    matches = list(Path(out).rglob(f"{stage}_summary.json"))
    if head is not None:
        matches = [m for m in matches if m.parent.name == head]
    assert len(matches) == 1, matches
    return json.loads(matches[0].read_text())


def one_class_scores(label_dir, n_classes):
    """(mIoU, pAcc) in percent of predicting one cluster everywhere, from the label files.

    Hungarian matching sends the one cluster to the majority class: its IoU is the majority
    fraction, every other class present scores 0.
    """
    counts = np.zeros(n_classes)
    for path in sorted(Path(label_dir).iterdir()):
        ids = np.array(Image.open(path)).reshape(-1)
        counts += np.bincount(ids[ids < n_classes], minlength=n_classes)
    majority = counts.max() / counts.sum()
    return 100 * majority / np.count_nonzero(counts), 100 * majority


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_all_stages_learn_and_write_artifacts(tmp_path, toy_dirs, dino_ckpt, head, capsys):
    out = tmp_path / "CAUSE"
    # 96 px at patch 8: a 12x12 grid, 9 tokens per image after grid sampling; a larger learning
    # rate so that a dozen steps move the tiny model measurably.
    train = flags(out, dino_ckpt, toy_dirs["train"], head, ["--epoch", "3", "--lr", "5e-3"], resolution=96)
    train_mediator.main(parse(train_mediator, train))
    train_front_door.main(parse(train_front_door, train))
    fine_tuning.main(parse(fine_tuning, train))
    val = flags(
        out,
        dino_ckpt,
        toy_dirs["val"],
        head,
        ["--save_images", "2", "--crf_workers", "0", "--linear_crf", "yes"],
        resolution=96,
        trained_on=toy_dirs["train"],
    )
    test_stage.main(parse(test_stage, val))

    art = dataset_dir(out, toy_dirs["train"][0]) / "dino_tiny8" / "16"
    codebook = np.load(dataset_dir(out, toy_dirs["train"][0]) / "modularity" / "dino_tiny8" / "16" / "modular.npy")
    assert codebook.shape == (16, 48) and codebook.dtype == np.float32
    seg = torch.load(art / f"segment_{head}.pth", weights_only=True)
    first = "head.f1.weight" if head == "mlp" else "head.tr.f1.weight"
    assert first in seg and "projection_head_ema.f.weight" in seg and "linear.f.weight" in seg
    cluster = torch.load(art / f"cluster_{head}.pth", weights_only=True)
    assert set(cluster) == {"codebook", "cluster_probe"}
    assert torch.equal(cluster["codebook"], torch.from_numpy(codebook))  # the released layout keeps the mediator

    # Every stage lowers its own objective on the same batch, dropout masks and grid picks.
    s1, s2, s3 = summary(out, "mediator"), summary(out, "front_door", head), summary(out, "fine_tuning", head)
    assert s1["fixed_batch_loss_end"] < s1["fixed_batch_loss_start"]
    assert s2["fixed_batch_loss_front_end"] < s2["fixed_batch_loss_front_start"]
    assert s3["fixed_batch_loss_mod_end"] < s3["fixed_batch_loss_mod_start"]
    for stage, stage_summary in (("front_door", s2), ("fine_tuning", s3)):
        log = (art / head / f"{stage}.jsonl").read_text().splitlines()
        assert stage_summary["probe_acc_last"] == json.loads(log[-1])["probe_acc"]
    assert not list(out.rglob("state_*.pt")), "a finished stage leaves no resumable state"
    printed = capsys.readouterr().out
    assert f"[front door {head}] saved {art / f'segment_{head}.pth'}; fixed-batch contrastive loss" in printed
    assert f"[fine-tuning {head}] saved {art / f'cluster_{head}.pth'}; fixed-batch modularity loss" in printed
    assert "CAUSE (cluster probe)" in printed and f"metrics: {art / head / 'metrics.json'}" in printed

    run = art / head
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["dataset"] == "folder" and metrics["head"] == head and metrics["n_classes"] == 6
    for key in ("cluster", "cluster_crf", "linear", "linear_crf", "kmeans", "kmeans_head"):
        assert 0.0 <= metrics[key]["mIoU"] <= 100.0 and 0.0 < metrics[key]["pAcc"] <= 100.0
    collapse_miou, majority_pacc = one_class_scores(toy_dirs["val"][1], 6)
    scores = {key: (metrics[key]["mIoU"], metrics[key]["pAcc"]) for key in metrics if isinstance(metrics[key], dict)}
    for key in ("cluster", "cluster_crf", "kmeans", "kmeans_head"):
        assert metrics[key]["mIoU"] > collapse_miou, (key, collapse_miou, scores)
    for key in ("linear", "linear_crf"):
        assert metrics[key]["pAcc"] > majority_pacc, (key, majority_pacc, scores)
    for name in (
        "iou.md",
        "confusion.png",
        "panels/0000.png",
        "panels/0001.png",
        "front_door.jsonl",
        "front_door_loss.png",
        "config_test.json",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "config_front_door.json").read_text())
    assert config["grad_clip"] == 1.0 and config["weight_decay"] == 1e-4 and config["num_queries"] == 144
    config = json.loads((run / "config_fine_tuning.json").read_text())
    assert config["stage"] == "fine_tuning" and config["head"] == head and config["epoch"] == 3
    records = [json.loads(line) for line in (run / "front_door.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 4 and {"loss_front", "loss_linear", "probe_acc", "lr"} <= set(records[0])
    # The learning-rate schedules (SPEC): stage 1 x0.2 every epoch, stage 3 x0.5 every two epochs.
    stage1_run = dataset_dir(out, toy_dirs["train"][0]) / "modularity" / "dino_tiny8" / "16"
    for log, expected in (
        (stage1_run / "mediator.jsonl", [5e-3, 1e-3, 2e-4]),
        (run / "fine_tuning.jsonl", [5e-3, 5e-3, 2.5e-3]),
    ):
        lrs = {}
        for line in log.read_text().splitlines():
            record = json.loads(line)
            lrs.setdefault(record["epoch"], set()).add(record["lr"])
        assert [sorted(lrs[epoch]) for epoch in range(3)] == [[pytest.approx(lr)] for lr in expected], log.name

    # predict.py on a folder of plain images, clusters renamed with test.py's matching.
    preds = tmp_path / "pred"
    images = toy_dirs["val"][0]
    predict.main(
        parse(
            predict,
            flags(
                out,
                dino_ckpt,
                toy_dirs["val"],
                head,
                ["--inputs", str(images), "--output", str(preds), "--metrics", str(run / "metrics.json")],
                resolution=96,
                trained_on=toy_dirs["train"],
            ),
        )
    )
    names = sorted(p.name for p in images.iterdir())
    assert sorted(p.name for p in preds.glob("*.color.png")) == [f"{n}.color.png" for n in names]
    ids = np.array(Image.open(preds / f"{names[0]}.png"))
    assert ids.shape == (96, 96) and set(np.unique(ids)) <= set(metrics["cluster_crf"]["assignment"])
    assert (run / "report.html").is_file() and (preds / "legend.png").is_file()


def released_segment_state(dim, r, e, c):
    """A stage-2/3 state dict written by hand in the released CAUSE-MLP layout."""
    g = torch.Generator().manual_seed(0)
    state = OrderedDict()
    for prefix in ("head", "head_ema"):
        state[f"{prefix}.f1.weight"] = torch.randn(r, dim, 1, 1, generator=g)
        state[f"{prefix}.f1.bias"] = torch.randn(r, generator=g)
        state[f"{prefix}.f2.0.weight"] = torch.randn(dim, dim, 1, 1, generator=g)
        state[f"{prefix}.f2.0.bias"] = torch.randn(dim, generator=g)
        state[f"{prefix}.f2.2.weight"] = torch.randn(r, dim, 1, 1, generator=g)
        state[f"{prefix}.f2.2.bias"] = torch.randn(r, generator=g)
    for prefix in ("projection_head", "projection_head_ema"):
        state[f"{prefix}.f.weight"] = torch.randn(e, r, 1, 1, generator=g)
        state[f"{prefix}.f.bias"] = torch.randn(e, generator=g)
    state["linear.f.weight"] = torch.randn(c, r, 1, 1, generator=g)
    state["linear.f.bias"] = torch.randn(c, generator=g)
    return state


def test_test_stage_loads_released_layout(tmp_path, toy_dirs, dino_ckpt):
    out = tmp_path / "CAUSE"
    args = parse(
        test_stage,
        flags(out, dino_ckpt, toy_dirs["val"], "mlp", ["--crf", "no", "--baseline", "none", "--save_images", "0"]),
    )
    store = artifact_store(args)
    atomic_np_save(np.random.default_rng(0).standard_normal((16, 48)).astype(np.float32), store.path("codebook"))
    atomic_torch_save(released_segment_state(48, 8, 16, 6), store.path("segment"))
    probe = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0]]).repeat(3, 1)
    atomic_torch_save(OrderedDict(codebook=torch.zeros(16, 48), cluster_probe=probe), store.path("cluster"))
    test_stage.main(args)
    metrics = json.loads(
        (dataset_dir(out, toy_dirs["val"][0]) / "dino_tiny8" / "16" / "mlp" / "metrics.json").read_text()
    )
    assert set(metrics) >= {"cluster", "linear"} and "cluster_crf" not in metrics
    # Only the first two centroids are distinct (rows repeat), so at most two clusters get pixels.
    assert metrics["clusters_used"] <= 2


def run_script(*argv, env=None):
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_missing_artifact_and_dataset_are_one_line_errors(tmp_path, toy_dirs, dino_ckpt):
    res = run_script(
        "fine_tuning.py", *for_script("fine_tuning.py", flags(tmp_path / "CAUSE", dino_ckpt, toy_dirs["train"]))
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "run train_mediator.py first" in res.stderr.strip().splitlines()[-1]

    res = run_script(
        "test.py",
        "--dataset",
        "folder",
        "--image_dir",
        str(toy_dirs["val"][0]),
        "--n_classes",
        "6",
        "--ckpt",
        dino_ckpt,
        "--out",
        str(tmp_path / "CAUSE"),
        "--cpu",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "predict.py" in res.stderr

    res = run_script(
        "train_mediator.py",
        "--dataset",
        "cocostuff27",
        "--data_dir",
        str(tmp_path / "nowhere"),
        "--ckpt",
        dino_ckpt,
        "--out",
        str(tmp_path / "CAUSE"),
        "--cpu",
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert str(tmp_path / "nowhere") in res.stderr.strip().splitlines()[-1]


def test_interrupted_save_leaves_no_partial_artifact(tmp_path, monkeypatch):
    target = tmp_path / "a" / "segment_mlp.pth"

    def broken_write(path, data):
        Path(path).write_bytes(data[:4])
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_write_file", broken_write)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"x": torch.zeros(1)}, str(target))
    assert list(target.parent.iterdir()) == []


def test_two_process_stage1_matches_single_process(tmp_path, toy_dirs, dino_ckpt):
    images, labels = toy_dirs["train"]
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    worker = str(ROOT / "tests" / "ddp_stage1_worker.py")
    env = {"PYTHONPATH": str(ROOT)}
    res = run_script(worker, dino_ckpt, str(images), str(labels), "8", str(single), env=env)
    assert res.returncode == 0, res.stderr
    res = run_script(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        worker,
        dino_ckpt,
        str(images),
        str(labels),
        "4",
        str(double),
        env=env,
    )
    assert res.returncode == 0, res.stderr
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert (a["world"], b["world"]) == (1, 2)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    torch.testing.assert_close(torch.tensor(b["grad"]), torch.tensor(a["grad"]), rtol=1e-4, atol=1e-7)


def test_backbone_normalisation_reaches_the_dataset(tmp_path, toy_dirs):
    from engine.cli import Run
    from engine.config import resolve
    from models.backbone import load_backbone
    from models.normalisation import CLIP_MEAN, CLIP_STD
    from utils.distributed import setup

    unicom = load_backbone(
        str(
            make_fake_checkpoint(
                tmp_path / "FP16-ViT-B-16.pt", "unicom", embed_dim=48, depth=2, patch_size=16, img_size=64
            )
        )
    )
    assert (unicom.family, unicom.mean, unicom.std) == ("unicom", tuple(CLIP_MEAN), tuple(CLIP_STD))
    images, labels = toy_dirs["val"]
    args = parse(
        test_stage, ["--dataset", "folder", "--image_dir", str(images), "--label_dir", str(labels), "--n_classes", "6"]
    )
    run = Run(resolve(args, 16, 6), setup("0", use_cpu=True), unicom, None)
    item = run.dataset("val", 96)[0]
    raw = torch.from_numpy(np.array(Image.open(sorted(images.iterdir())[0]).convert("RGB"))).float() / 255
    expected = (raw.permute(2, 0, 1) - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(item["img"], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("drop_last, sizes", [("yes", [5, 5, 5]), ("no", [5, 5, 5, 1])])
def test_drop_last_flag_keeps_or_skips_the_incomplete_batch(tmp_path, toy_dirs, dino_ckpt, drop_last, sizes):
    from engine.cli import Run
    from engine.config import resolve
    from models.backbone import load_backbone
    from utils.distributed import setup

    args = parse(
        train_mediator,
        flags(tmp_path, dino_ckpt, toy_dirs["train"], extra=["--batch_size", "5", "--drop_last", drop_last]),
    )
    loader, sampler = Run(resolve(args, 8, 6), setup("0", use_cpu=True), load_backbone(dino_ckpt), None).train_loader()
    sampler.set_epoch(0)
    batches = [batch["ind"].tolist() for batch in loader]
    assert [len(b) for b in batches] == sizes
    assert len(set(sum(batches, []))) == sum(sizes)


@pytest.mark.parametrize("family", ["unicom", "dinov3"])
def test_run_sh_with_an_official_checkpoint_file(tmp_path, toy_dirs, family):
    """Every stage and the test stage run with a Unicom file, or with a DINOv3 file in Meta's layout."""
    # Spaces in the checkpoint, output and data paths (run.sh quotes them).
    if family == "unicom":
        ckpt = make_fake_checkpoint(
            tmp_path / "check points" / "FP16-ViT-B-16.pt", "unicom", embed_dim=48, depth=2, patch_size=16, img_size=64
        )
    else:
        ckpt = tmp_path / "check points" / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
        ckpt.parent.mkdir()
        torch.save(timm_dinov3_to_meta(make_dinov3_timm(embed_dim=48, num_heads=1)), ckpt)
    images, labels = toy_dirs["train"]
    # 128 px: patch 16 then leaves 4 grid-sampled tokens per image (at 64 px, one: a NaN modularity loss).
    extra = (
        f"--image_dir {images} --label_dir {labels} --n_classes 6 --num_codebook 16 --batch_size 4 "
        f"--num_workers 0 --train_resolution 128 --cpu"
    )
    env = {
        "dataset": "folder",
        "ckpt": str(ckpt),
        "out": str(tmp_path / "CAUSE out"),
        "extra": extra,
        "head_flags": "--projection_dim 16 --reduced_dim 8",
        "train_flags": "--max_steps 2 --epoch 1",
        "test_flags": "--crf_workers 0 --save_images 1 --test_resolution 128",
        "data_dir": str(tmp_path / "my data"),
    }
    res = subprocess.run(
        ["bash", "run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    run = dataset_dir(tmp_path / "CAUSE out", images) / ckpt.stem / "16" / "mlp"
    config = json.loads((run / "config_test.json").read_text())
    norm = NORMALISATIONS["clip" if family == "unicom" else "imagenet"]
    assert config["family_resolved"] == family and config["norm_resolved"] == pytest.approx([*norm[0], *norm[1]])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cluster"]["mIoU"] > one_class_scores(labels, 6)[0], metrics["cluster"]
    assert "cluster_crf" in metrics and "kmeans" in metrics
    assert "CAUSE + CRF" in res.stdout


def test_corrupt_image_in_a_worker_is_a_one_line_error(tmp_path, dino_ckpt):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(b"not a png")
    res = run_script(
        "train_mediator.py",
        "--dataset",
        "folder",
        "--image_dir",
        str(images),
        "--n_classes",
        "3",
        "--ckpt",
        dino_ckpt,
        "--out",
        str(tmp_path / "CAUSE"),
        "--num_workers",
        "1",
        "--batch_size",
        "2",
        "--train_resolution",
        "64",
        "--cpu",
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert lines[-1].startswith("error: ") and any(f"{i}.png" in lines[-1] for i in range(4))


def test_ctrl_c_stops_a_stage_without_artifacts(tmp_path, toy_dirs, dino_ckpt):
    import signal
    import time

    out = tmp_path / "CAUSE"
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1000"])
    proc = subprocess.Popen(
        [sys.executable, "train_mediator.py", *for_script("train_mediator.py", argv)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal, even in a background job
    )
    log = dataset_dir(out, toy_dirs["train"][0]) / "modularity" / "dino_tiny8" / "16" / "mediator.running.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in stderr.strip().splitlines()[-1]
    # No artifact; at most the resumable state of finished epochs (docs/resume.md) besides the config and
    # log of the interrupted run, kept apart from a complete run's.
    names = sorted(p.name for p in log.parent.iterdir() if not p.name.startswith("state_mediator.pt"))
    assert names == ["config_mediator.running.json", "mediator.running.jsonl"]


def test_gpu_list_spawns_one_process_per_id(tmp_path, toy_dirs, dino_ckpt):
    """--gpu 0,1 spawns two processes like the reference (gloo on CPU); lr and logs follow the world size."""
    out = tmp_path / "CAUSE"
    argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--max_steps", "2"])
    argv[argv.index("--gpu") + 1] = "0,1"
    res = run_script("train_mediator.py", *for_script("train_mediator.py", argv), "--port", "29533")
    assert res.returncode == 0, res.stderr[-2000:]
    run = dataset_dir(out, toy_dirs["train"][0]) / "modularity" / "dino_tiny8" / "16"
    config = json.loads((run / "config_mediator.json").read_text())
    assert config["world_size"] == 2
    records = [json.loads(line) for line in (run / "mediator.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["lr"] == pytest.approx(2e-3)

    # A failing process stops the job with a non-zero exit and one line, not a hang.
    res = run_script("fine_tuning.py", *for_script("fine_tuning.py", argv), "--port", "29534")
    assert res.returncode == 2 and "run train_front_door.py first" in res.stderr.strip().splitlines()[-1]
