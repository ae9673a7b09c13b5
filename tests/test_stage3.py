"""Stage 3's two protocols: the reference's (labels train the teacher head) and label-free."""

import json
import shutil

import pytest
import torch

import fine_tuning
import test as test_stage
import train_front_door
import train_mediator
from modules.objectives import fine_tuning_step
from modules.segment import SegmentMLP, SegmentTR
from tests._stage_flags import dataset_dir, flags, parse


def one_step_grads(segment, reference):
    torch.manual_seed(0)
    segment.train()
    segment.requires_grad_(True)
    tokens = torch.randn(2, 64, 16)
    label = torch.randint(0, 5, (2, 32, 32))
    probe = torch.nn.Parameter(torch.rand(5, 8) * 0.4 - 0.2)
    out = fine_tuning_step(segment, probe, tokens, label, 5, reference=reference)
    out["loss"].backward()
    return ({name: p.grad for name, p in segment.named_parameters()}, probe.grad)


@pytest.mark.parametrize(
    "make", [lambda: SegmentMLP(16, 8, 12, 5), lambda: SegmentTR(16, 8, 12, 5, 64)], ids=["mlp", "tr"]
)
def test_reference_stage3_trains_the_teacher_head_and_label_free_does_not(make):
    for reference in (True, False):
        torch.manual_seed(1)
        segment = make()
        if isinstance(segment, SegmentTR):
            segment.set_codebook(torch.randn(10, 16))
        grads, probe_grad = one_step_grads(segment, reference)
        teacher = [g for name, g in grads.items() if name.startswith("head_ema.")]
        assert probe_grad is not None and probe_grad.abs().sum() > 0
        assert grads["linear.f.weight"].abs().sum() > 0
        if reference:
            assert all(g is not None for g in teacher) and sum(g.abs().sum() for g in teacher) > 0
        else:
            assert all(g is None for g in teacher)
        # Neither protocol reaches the student or the projection heads.
        assert all(g is None for name, g in grads.items() if name.startswith(("head.", "projection_head")))


def test_label_free_stage3_leaves_the_teacher_head_bit_identical(tmp_path, toy_dirs, dino_ckpt):
    out = tmp_path / "CAUSE"
    train = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1", "--max_steps", "2"])
    train_mediator.main(parse(train_mediator, train))
    train_front_door.main(parse(train_front_door, train))
    path = dataset_dir(out, toy_dirs["train"][0]) / "dino_tiny8" / "16" / "segment_mlp.pth"
    stage2 = torch.load(path, weights_only=True)
    moved, copies = {}, {}
    for choice in ("no", "yes"):
        torch.save(stage2, path)
        fine_tuning.main(parse(fine_tuning, train + ["--reference_stage3", choice]))
        stage3 = torch.load(path, weights_only=True)
        moved[choice] = [k for k in stage2 if k.startswith("head_ema.") and not torch.equal(stage2[k], stage3[k])]
        assert not torch.equal(stage2["linear.f.weight"], stage3["linear.f.weight"])
        run = path.parent / "mlp"
        protocol = "label_free" if choice == "no" else "reference"
        assert json.loads((run / "fine_tuning_summary.json").read_text())["stage3"] == protocol
        # A copy of the heads elsewhere; the label-free segment keeps its provenance record.
        copies[choice] = tmp_path / choice
        copies[choice].mkdir()
        for name in ("segment_mlp.pth", "cluster_mlp.pth", "cluster_mlp.pth.json") + (
            ("segment_mlp.pth.json",) if choice == "no" else ()
        ):
            shutil.copy(path.parent / name, copies[choice] / name)
    # test.py reports the protocol of the head it evaluates, from the head's own provenance record;
    # a head by path without one is "unknown".
    evaluate = flags(
        out, dino_ckpt, toy_dirs["val"], "mlp", ["--crf", "no", "--save_images", "0"], trained_on=toy_dirs["train"]
    )
    for by_path, expected in ((None, "reference"), ("no", "label_free"), ("yes", "unknown")):
        extra = (
            []
            if by_path is None
            else [
                "--segment",
                str(copies[by_path] / "segment_mlp.pth"),
                "--cluster",
                str(copies[by_path] / "cluster_mlp.pth"),
            ]
        )
        test_stage.main(parse(test_stage, evaluate + extra))
        assert json.loads((path.parent / "mlp" / "metrics.json").read_text())["stage3"] == expected, by_path
    assert moved["no"] == [] and len(moved["yes"]) > 0


def test_stage3_on_a_folder_without_labels_is_label_free_and_says_so(tmp_path, toy_dirs, dino_ckpt, capsys):
    """--reference_stage3 yes (the default) asks for the labels; without any, what ran is recorded."""
    out = tmp_path / "CAUSE"
    train = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1", "--max_steps", "1"])
    at = train.index("--label_dir")
    train = train[:at] + train[at + 2 :]
    for stage in (train_mediator, train_front_door, fine_tuning):
        stage.main(parse(stage, train))
    run = dataset_dir(out, toy_dirs["train"][0]) / "dino_tiny8" / "16" / "mlp"
    assert json.loads((run / "fine_tuning_summary.json").read_text())["stage3"] == "label_free"
    record = json.loads((run.parent / "segment_mlp.pth.json").read_text())
    assert record["flags"]["stage3"] == "label_free"
    assert "stage 3 label-free: no label reached the teacher head" in capsys.readouterr().out
