"""predict.py on pictures of any size and kind, its output safety, and trained heads loaded by path."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import test as test_stage
from engine import cli
from engine.build import load_into, read_artifact
from engine.store import ArtifactMismatchError
from loader.images import list_images, output_stems, to_display_rgb
from loader.labels import read_image
from modules.segment import SegmentMLP
from tests._released_heads import CLASSES, head_flags, write_released_heads
from tests._stage_flags import parse
from utils.errors import EXIT_SKIPPED_INPUTS, BadInputError

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    return {head: write_released_heads(root / head, head) for head in ("mlp", "tr")}


def gradient(height, width):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(np.uint8)


def write_odd_pictures(folder):
    """Pictures of awkward sizes and modes -> {file name: displayed (height, width)}."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(517, 333)).save(folder / "tall.jpg")
    Image.fromarray(gradient(70, 90)[..., 0]).save(folder / "gray.png")
    rgba = np.concatenate([gradient(50, 81), np.full((50, 81, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray((np.arange(66 * 99).reshape(66, 99) * 10).astype(np.uint16)).save(folder / "deep16.png")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # stored 100 wide x 60 high, displayed rotated: 60 wide x 100 high
    Image.fromarray(gradient(60, 100)).save(folder / "rotated.jpg", exif=exif)
    return {
        "tall.jpg": (517, 333),
        "gray.png": (70, 90),
        "alpha.png": (50, 81),
        "deep16.png": (66, 99),
        "rotated.jpg": (100, 60),
    }


def run_predict(ckpt, head, paths, inputs, output, *extra):
    args = parse(
        predict,
        head_flags(ckpt, head, paths, output.parent / "CAUSE")
        + ["--inputs", str(inputs), "--output", str(output), *extra],
    )
    return predict.main(args)


def run_cli(script, argv, capsys):
    """The script's command line in this process -> (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        cli.run(script.cli_main if script is predict else script.main, script.parser(), argv, single_process=True)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


@pytest.mark.parametrize("head,crf", [("mlp", "yes"), ("tr", "no")])
def test_every_pixel_of_every_picture_is_labelled_at_its_displayed_size(tmp_path, dino_ckpt, released, head, crf):
    sizes = write_odd_pictures(tmp_path / "in")
    out = tmp_path / "out"
    assert run_predict(dino_ckpt, head, released[head], tmp_path / "in", out, "--crf", crf) == []
    for name, size in sizes.items():
        ids = np.array(Image.open(out / f"{name}.png"))
        assert ids.shape == size and ids.dtype == np.uint8, name
        assert ids.max() < CLASSES, name
        color = np.array(Image.open(out / f"{name}.color.png"))
        mixed = np.array(Image.open(out / f"{name}.overlay.png"))
        assert color.shape == mixed.shape == (*size, 3), name
        photo = np.array(to_display_rgb(Image.open(tmp_path / "in" / name)), dtype=np.int16)
        assert np.abs((photo + color) / 2 - mixed).max() <= 1, name  # the overlay mixes photo and colours
    assert Image.open(out / "legend.png").size[0] > 50


def test_pictures_stream_through_without_piling_up(tmp_path, dino_ckpt, released, monkeypatch):
    """A picture's files are written while the following ones are segmented: at most one waits (no CRF pool)."""
    write_odd_pictures(tmp_path / "in")
    events, scores, save_png = [], predict.CauseSegmenter.picture_scores, predict.save_png
    monkeypatch.setattr(predict, "save_png", lambda path, *a, **k: events.append("save") or save_png(path, *a, **k))
    monkeypatch.setattr(
        predict.CauseSegmenter, "picture_scores", lambda *a, **k: events.append("score") or scores(*a, **k)
    )
    assert run_predict(dino_ckpt, "mlp", released["mlp"], tmp_path / "in", tmp_path / "out", "--crf", "no") == []
    assert events.count("score") == 5 and events.count("save") == 5 * 3
    assert events.index("save") < [i for i, e in enumerate(events) if e == "score"][2], events


def test_16_bit_palette_and_exif_pictures_are_read_as_displayed(tmp_path):
    ramp = (np.arange(256 * 4).reshape(4, 256) * 64).astype(np.uint16)
    rgb = np.array(to_display_rgb(Image.fromarray(ramp)))
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() >= 254 and (rgb[..., 0] == 255).mean() < 0.01
    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert np.array(to_display_rgb(palette))[0, 1].tolist() == [200, 100, 50]
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored = gradient(30, 50)
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    # The training loader sees the displayed picture too, so labels drawn on it line up.
    shown = np.array(read_image(str(tmp_path / "r.png")))
    assert shown.shape == (50, 30, 3) and np.array_equal(shown, np.rot90(stored, k=-1))


def test_output_equal_to_inputs_is_refused_and_leaves_inputs_untouched(tmp_path, dino_ckpt, released, capsys):
    write_odd_pictures(tmp_path / "in")
    before = digest(tmp_path / "in")
    code, _, err = run_cli(
        predict,
        head_flags(dino_ckpt, "mlp", released["mlp"], tmp_path / "CAUSE")
        + ["--inputs", str(tmp_path / "in"), "--output", str(tmp_path / "in"), "--overwrite"],
        capsys,
    )
    assert code == 2 and "Traceback" not in err
    assert "is an input folder" in err.strip().splitlines()[-1]
    assert digest(tmp_path / "in") == before


def test_same_stem_gives_distinct_results_and_existing_files_are_kept(tmp_path, dino_ckpt, released):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(gradient(64, 80)).save(folder / "x.jpg")
    Image.fromarray(255 - gradient(72, 64)).save(folder / "x.png")
    Image.fromarray(gradient(64, 64)).save(folder / "y_color.png")
    out = tmp_path / "out"
    run_predict(dino_ckpt, "mlp", released["mlp"], folder, out, "--crf", "no")
    assert np.array(Image.open(out / "x.jpg.png")).shape == (64, 80)
    assert np.array(Image.open(out / "x.png.png")).shape == (72, 64)
    assert (out / "y_color.png.color.png").is_file()
    assert len(list(out.iterdir())) == 3 * 3 + 1
    before = digest(out)
    with pytest.raises(ValueError, match="already exist.*--overwrite"):
        run_predict(dino_ckpt, "mlp", released["mlp"], folder, out, "--crf", "no")
    assert digest(out) == before
    run_predict(dino_ckpt, "mlp", released["mlp"], str(folder / "x.*"), out, "--crf", "no", "--overwrite")


def test_glob_over_folders_mirrors_the_tree():
    files = ["/d/a/x.jpg", "/d/b/x.jpg", "/d/b/c/x.png"]
    assert output_stems(files) == ["a/x.jpg", "b/x.jpg", "b/c/x.png"]
    assert output_stems(["/d/a/x.jpg"]) == ["x.jpg"]


def test_corrupt_file_is_skipped_by_name_and_the_exit_code_says_so(tmp_path, dino_ckpt, released, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(gradient(64, 70)).save(folder / name)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    code, out, err = run_cli(
        predict,
        head_flags(dino_ckpt, "mlp", released["mlp"], tmp_path / "CAUSE")
        + ["--inputs", str(folder), "--output", str(tmp_path / "out"), "--crf", "no"],
        capsys,
    )
    assert code == EXIT_SKIPPED_INPUTS == 4, err[-2000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and str(folder / "b.png") in warnings[0]
    assert (tmp_path / "out" / "a.png.png").is_file() and (tmp_path / "out" / "c.png.png").is_file()
    assert not (tmp_path / "out" / "b.png.png").exists()
    assert "2 of 3 images" in out


def test_released_heads_load_by_path_in_test_and_predict(tmp_path, toy_dirs, dino_ckpt, released):
    out = tmp_path / "CAUSE"
    images, labels = toy_dirs["val"]
    flags = head_flags(dino_ckpt, "tr", released["tr"], out) + [
        "--image_dir",
        str(images),
        "--label_dir",
        str(labels),
        "--crf",
        "no",
        "--baseline",
        "none",
        "--save_images",
        "1",
    ]
    test_stage.main(parse(test_stage, flags))
    metrics_path = next(out.rglob("metrics.json"))
    metrics = json.loads(metrics_path.read_text())
    assert metrics["head"] == "tr" and 0 <= metrics["cluster"]["mIoU"] <= 100
    assert not any(out.rglob("*.pth")) and not any(out.rglob("*.npy"))  # nothing copied into a tree
    preds = tmp_path / "pred"
    run_predict(dino_ckpt, "tr", released["tr"], images, preds, "--crf", "no", "--metrics", str(metrics_path))
    ids = np.array(Image.open(preds / f"{sorted(os.listdir(images))[0]}.png"))
    assert ids.shape == (96, 96) and set(np.unique(ids).tolist()) <= set(metrics["cluster"]["assignment"])


@pytest.mark.parametrize(
    "change,expected",
    [
        (["--head", "mlp"], "head=tr"),
        (["--n_classes", "5"], "n_classes=6"),
        (["--train_resolution", "96", "--test_resolution", "96"], "num_queries=64"),
        (["--reduced_dim", "12"], "reduced_dim=8"),
    ],
)
def test_mismatched_head_is_one_line_naming_both_sides(tmp_path, dino_ckpt, released, change, expected):
    argv = (
        head_flags(dino_ckpt, "tr", released["tr"], tmp_path / "CAUSE")
        + change
        + ["--inputs", str(tmp_path), "--output", str(tmp_path / "out")]
    )
    Image.fromarray(gradient(64, 64)).save(tmp_path / "p.png")
    with pytest.raises(BadInputError) as err:  # the pre-flight check reads the file before any module is built
        predict.main(parse(predict, argv))
    message = str(err.value)
    assert "\n" not in message and str(released["tr"]["segment"]) in message
    assert expected in message.split("; expected")[0] and "expected" in message


def test_a_state_that_does_not_load_is_one_line_naming_the_file():
    """Past the pre-flight's description check: a strict-load failure and a cluster file of other tensors."""
    segment, extra = SegmentMLP(48, 8, 16, 6), {"head.surprise": torch.zeros(1)}
    with pytest.raises(ArtifactMismatchError) as err:
        load_into(segment, {**segment.state_dict(), **extra}, "/runs/segment_mlp.pth")
    message = str(err.value)
    assert "\n" not in message and message.startswith("/runs/segment_mlp.pth does not fit the SegmentMLP built")
    assert "head.surprise" in message

    class Store:
        def state(self, kind):
            return {"centroids": torch.zeros(6, 8)}

        def path(self, kind):
            return f"/runs/{kind}_mlp.pth"

    with pytest.raises(ArtifactMismatchError, match=r"^/runs/cluster_mlp.pth holds \['centroids'\], not codebook"):
        read_artifact(Store(), "cluster", None, 48)


def test_mismatched_head_from_the_command_line_exits_2(tmp_path, dino_ckpt, released, capsys):
    Image.fromarray(gradient(64, 64)).save(tmp_path / "p.png")
    code, _, err = run_cli(
        test_stage,
        head_flags(dino_ckpt, "mlp", released["tr"], tmp_path / "CAUSE")
        + ["--image_dir", str(tmp_path), "--label_dir", str(tmp_path)],
        capsys,
    )
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err
    assert "holds head=tr, width=48" in lines[-1] and "expected head=mlp" in lines[-1]


def test_list_images_takes_a_file_a_folder_or_a_glob(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.JPG").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    assert list_images(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]
    assert [Path(p).name for p in list_images(str(tmp_path))] == ["a.png", "b.JPG"]
    assert [Path(p).name for p in list_images(str(tmp_path / "*.png"))] == ["a.png"]
    with pytest.raises(FileNotFoundError):
        list_images(str(tmp_path / "*.gif"))
