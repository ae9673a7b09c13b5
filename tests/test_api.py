"""The Python API: CauseSegmenter from files, from a run and through torch.hub gives predict.py's labels."""

import doctest
import json
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
from engine import segmenter as segmenter_module
from engine.segmenter import CauseSegmenter
from tests._released_heads import CLASSES, RESOLUTION, head_flags, write_released_heads
from tests._stage_flags import flags, for_script, parse

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {head: write_released_heads(root / head, head, seed=3) for head in ("mlp", "tr")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two pictures of awkward sizes in a folder."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for name, size in (("wide.png", (41, 97)), ("tall.jpg", (130, 70))):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def predict_py(argv, inputs, output, *extra):
    """predict.py's id maps -> {file name: uint8 [H, W]}."""
    assert predict.main(parse(predict, [*argv, "--inputs", str(inputs), "--output", str(output), *extra])) == []
    return {p.name[: -len(".png")]: np.array(Image.open(p)) for p in output.glob("*.png") if p.name.count(".") == 2}


def from_released(ckpt, head, paths):
    return CauseSegmenter.from_files(ckpt, test_resolution=RESOLUTION, **paths)


@pytest.mark.parametrize("head,crf", [("mlp", "yes"), ("tr", "no")])
def test_from_files_labels_equal_predict_py(tmp_path, dino_ckpt, released, photos, head, crf):
    segmenter = from_released(dino_ckpt, head, released[head])
    assert segmenter.window == RESOLUTION and segmenter.device == torch.device("cpu")
    side = 48 if head == "mlp" else segmenter.window  # the TR head's queries fix its input size
    scores = segmenter(torch.randn(2, 3, side, side))
    assert scores.shape == (2, CLASSES, side, side)
    assert scores.abs().max() <= 1 + 1e-5

    argv = head_flags(dino_ckpt, head, released[head], tmp_path / "CAUSE")
    expected = predict_py(argv, photos, tmp_path / "out", "--crf", crf, "--ids_only")
    assert sorted(expected) == ["tall.jpg", "wide.png"]
    for name, ids in expected.items():
        labels = segmenter.predict(Image.open(photos / name), crf=crf == "yes")
        assert labels.dtype == torch.int64 and labels.shape == ids.shape
        assert np.array_equal(labels.numpy(), ids), name
        # uint8 arrays are pictures too
        assert torch.equal(segmenter.predict(np.asarray(Image.open(photos / name)), crf=crf == "yes"), labels)


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_forward_takes_any_size_and_answers_at_that_size(dino_ckpt, released, head):
    """A square of whole patches (the TR head: its own side) goes through as it is; any other input is resized to
    the window and its scores resized back to the input's size."""
    segmenter = from_released(dino_ckpt, head, released[head])
    patch, window = segmenter.backbone.patch_size, segmenter.window

    def literal(img, side):
        small = torch.nn.functional.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)
        u = segmenter.features(small)[0]
        return segmenter.scores(torch.nn.functional.interpolate(u, size=img.shape[-2:], mode="bilinear"))

    torch.manual_seed(0)
    for shape in ((1, 3, 37, 70), (2, 3, 3 * patch, 3 * patch), (1, 3, window, window)):
        img = torch.randn(shape)
        as_is = shape[-1] % patch == 0 and (head == "mlp" or shape[-1] == window)
        scores = segmenter(img)
        assert scores.shape == (shape[0], CLASSES, *shape[-2:])
        torch.testing.assert_close(scores, literal(img, shape[-1] if as_is else window), rtol=0, atol=1e-6)


def test_wrong_head_and_bad_overlap_are_refused(dino_ckpt, released):
    with pytest.raises(Exception, match="holds mlp head, not tr"):
        CauseSegmenter.from_files(dino_ckpt, head="tr", **released["mlp"])
    segmenter = from_released(dino_ckpt, "mlp", released["mlp"])
    with pytest.raises(Exception, match="overlap must be in"):
        segmenter.predict(np.zeros((20, 20, 3), np.uint8), overlap=1.0)
    with pytest.raises(Exception, match="matched labels need the classes"):
        segmenter.predict(np.zeros((20, 20, 3), np.uint8), crf=False, matched=True)


def test_torch_hub_entries_build_the_same_module(dino_ckpt, released):
    for head in ("mlp", "tr"):
        local = torch.hub.load(
            str(ROOT), f"cause_{head}", source="local", ckpt=dino_ckpt, test_resolution=RESOLUTION, **released[head]
        )
        direct = from_released(dino_ckpt, head, released[head])
        assert isinstance(local, CauseSegmenter)
        theirs, ours = local.state_dict(), direct.state_dict()
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
        img = torch.randn(1, 3, 64, 64)
        assert torch.equal(local(img), direct(img))


def test_double_precision_and_autocast(dino_ckpt, released):
    segmenter = from_released(dino_ckpt, "tr", released["tr"])
    img = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        single = segmenter(img)
        double = segmenter.double()(img.double())
        assert double.dtype == torch.float64
        assert torch.allclose(double.float(), single, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = segmenter.float()(img)
    assert torch.isfinite(low).all() and (low.float() - single).abs().mean() < 0.02  # bfloat16: 3 digits
    assert (low.argmax(1) == single.argmax(1)).float().mean() > 0.9


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, toy_dirs, dino_ckpt):
    """A tiny run of all four stages (MLP head); returns its run directory."""
    out = tmp_path_factory.mktemp("run") / "CAUSE"
    train = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "1"], resolution=64)
    for stage in (train_mediator, train_front_door, fine_tuning):
        stage.main(parse(stage, train))
    val = flags(
        out, dino_ckpt, toy_dirs["val"], "mlp", ["--crf_workers", "0"], resolution=64, trained_on=toy_dirs["train"]
    )
    test_stage.main(parse(test_stage, val))
    (metrics,) = out.rglob("metrics.json")
    return metrics.parent, val


def test_from_run_gives_predict_py_matched_classes(tmp_path, trained_run, toy_dirs):
    run_dir, val = trained_run
    metrics = run_dir / "metrics.json"
    segmenter = CauseSegmenter.from_run(metrics)
    assignment = json.loads(metrics.read_text())["cluster_crf"]["assignment"]
    assert segmenter.classes[0].tolist() == assignment
    expected = predict_py(
        for_script(predict, val), toy_dirs["val"][0], tmp_path / "out", "--metrics", str(metrics), "--ids_only"
    )
    assert len(expected) == 8
    for name, ids in expected.items():
        labels = segmenter.predict(Image.open(toy_dirs["val"][0] / name), matched=True)
        assert np.array_equal(labels.numpy(), ids), name
    # the run directory names the same model as its metrics.json
    again = CauseSegmenter.from_run(run_dir).state_dict()
    assert all(torch.equal(again[k], v) for k, v in segmenter.state_dict().items())


def test_from_run_keeps_the_runs_crf_weight(tmp_path, trained_run):
    """The CRF weight comes from the run's configuration (a copy of it with --crf_alpha 5 here)."""
    run_dir, _ = trained_run
    config = json.loads((run_dir / "config_test.json").read_text())
    (tmp_path / "config_test.json").write_text(json.dumps({**config, "crf_alpha": 5.0}))
    assert CauseSegmenter.from_run(tmp_path).crf_alpha == 5.0
    assert CauseSegmenter.from_run(tmp_path, crf_alpha=2.0).crf_alpha == 2.0


def test_from_run_on_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(Exception, match="not a run dir"):
        CauseSegmenter.from_run(tmp_path)


def test_module_docstring_example_runs(trained_run, toy_dirs):
    run_dir, _ = trained_run
    photo = Image.open(next(iter(sorted(toy_dirs["val"][0].iterdir()))))
    globs = {"CauseSegmenter": CauseSegmenter, "run_dir": run_dir, "photo": photo, "images": torch.randn(2, 3, 64, 64)}
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in doctest.DocTestFinder(recurse=False).find(segmenter_module, globs=globs):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 4 and results.failed == 0
