import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import crop_dataset
from crop_dataset import crop_array, crop_boxes
from loader.datasets import build_dataset, cropped_dir, incomplete_marker
from loader.labels import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOC_TRAIN_IDS = ["2007_000032", "2007_000039"]
COCO_TRAIN_IDS = ["000000000009", "000000000025", "000000000030"]


def _write(array, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)


def _label(height, width, values, seed):
    rng = np.random.default_rng(seed)
    return np.asarray(values, dtype=np.uint8)[rng.integers(0, len(values), (height, width))]


def make_voc_train(root, height=31, width=46):
    base = os.path.join(root, "pascalvoc", "VOCdevkit", "VOC2012")
    for n, image_id in enumerate(VOC_TRAIN_IDS):
        rng = np.random.default_rng(n)
        _write(
            rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            os.path.join(base, "JPEGImages", f"{image_id}.jpg"),
        )
        _write(_label(height, width, (0, 3, 20, 255), n), os.path.join(base, "SegmentationClass", f"{image_id}.png"))
    os.makedirs(os.path.join(base, "ImageSets", "Segmentation"), exist_ok=True)
    with open(os.path.join(base, "ImageSets", "Segmentation", "train.txt"), "w") as f:
        f.write("\n".join(VOC_TRAIN_IDS) + "\n")
    return base


def make_coco_train(root):
    base = os.path.join(root, "cocostuff")
    for n, image_id in enumerate(COCO_TRAIN_IDS):
        rng = np.random.default_rng(n)
        _write(
            rng.integers(0, 256, (40, 52, 3), dtype=np.uint8),
            os.path.join(base, "images", "train2017", f"{image_id}.jpg"),
        )
        _write(_label(40, 52, (0, 156, 255, 181), n), os.path.join(base, "annotations", "train2017", f"{image_id}.png"))
    os.makedirs(os.path.join(base, "curated", "train2017"), exist_ok=True)
    with open(os.path.join(base, "curated", "train2017", "Coco164kFull_Stuff_Coarse.txt"), "w") as f:
        f.write("\n".join(COCO_TRAIN_IDS) + "\n")
    return base


def _tree(directory):
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.mark.parametrize("height,width", [(31, 46), (50, 37), (20, 20)])
def test_crop_geometry_matches_torchvision_ten_crop(height, width):
    source = torch.arange(height * width).reshape(1, height, width)
    ratios = (0.3, 0.4, 0.5, 0.6, 0.7)
    expected = []
    for ratio in ratios:
        expected += TF.ten_crop(source, [int(height * ratio), int(width * ratio)])
    boxes = crop_boxes(height, width, ratios, ten=True)
    assert len(boxes) == 50
    for box, crop in zip(boxes, expected):
        assert np.array_equal(crop_array(source[0].numpy(), box), crop[0].numpy())
    five = crop_boxes(height, width, (0.5,), ten=False)
    for box, crop in zip(five, TF.five_crop(source, [int(height * 0.5), int(width * 0.5)])):
        assert np.array_equal(crop_array(source[0].numpy(), box), crop[0].numpy())


def test_super_crops_of_pascalvoc(tmp_path):
    base = make_voc_train(tmp_path)
    root = str(tmp_path)
    crop_root, written, total = crop_dataset.crop_dataset("pascalvoc", root, progress=False)
    assert crop_root == cropped_dir("pascalvoc", root) and written == total == 100
    assert not os.path.exists(incomplete_marker(crop_root, "train"))
    assert len(os.listdir(os.path.join(crop_root, "img", "train"))) == 100

    # image 1, crop 17: ratio 0.4 (crops 10-19), flipped (15-19), bottom-left -> file 1 * 50 + 17
    image = Image.open(os.path.join(base, "JPEGImages", f"{VOC_TRAIN_IDS[1]}.jpg")).convert("RGB")
    raw = np.array(Image.open(os.path.join(base, "SegmentationClass", f"{VOC_TRAIN_IDS[1]}.png"))).astype(np.int64)
    label = np.where(raw > 20, -1, raw)
    size = [int(31 * 0.4), int(46 * 0.4)]
    image_crop = TF.ten_crop(TF.pil_to_tensor(image), size)[5 + 2]
    label_crop = TF.ten_crop(torch.from_numpy(label + 1).to(torch.uint8)[None], size)[5 + 2]
    stored_label = np.array(Image.open(os.path.join(crop_root, "label", "train", "67.png")))
    assert np.array_equal(stored_label, label_crop[0].numpy())
    encoded = io.BytesIO()
    Image.fromarray(image_crop.permute(1, 2, 0).numpy()).save(encoded, format="JPEG")
    with open(os.path.join(crop_root, "img", "train", "67.jpg"), "rb") as f:
        assert f.read() == encoded.getvalue()

    # the training loader reads them back with labels -1 = ignore
    dataset = build_dataset("pascalvoc", root, "train", 16)
    assert len(dataset) == 100
    item = dataset[67]
    assert item["img"].shape == (3, 16, 16)
    resized = TF.resize(Image.fromarray(stored_label), [16, 16], interpolation=TF.InterpolationMode.NEAREST)
    assert torch.equal(item["label"], torch.from_numpy(np.array(resized).astype(np.int64) - 1))
    assert set(item["label"].unique().tolist()) <= {-1, 0, 3, 20}


def test_resume_rewrites_only_missing_crops(tmp_path):
    make_coco_train(tmp_path)
    root = str(tmp_path)
    crop_root, written, total = crop_dataset.crop_dataset("cocostuff27", root, progress=False)
    assert crop_root.endswith(os.path.join("cocostuff", "cropped", "cocostuff_five_crop_0.5"))
    assert written == total == 15
    before = _tree(crop_root)
    stamp = os.stat(os.path.join(crop_root, "img", "train", "4.jpg")).st_mtime_ns
    assert crop_dataset.crop_dataset("cocostuff27", root, progress=False)[1] == 0
    assert os.stat(os.path.join(crop_root, "img", "train", "4.jpg")).st_mtime_ns == stamp
    os.remove(os.path.join(crop_root, "label", "train", "7.png"))
    assert crop_dataset.crop_dataset("cocostuff27", root, progress=False)[1] == 1
    assert _tree(crop_root) == before
    labels = np.array(Image.open(os.path.join(crop_root, "label", "train", "7.png")))
    assert set(np.unique(labels).tolist()) <= {0, 10, 24, 25}  # +1 of classes 9, 23, 24 and ignore


def test_workers_write_the_same_files(tmp_path):
    make_coco_train(tmp_path / "serial")
    shutil.copytree(tmp_path / "serial", tmp_path / "parallel")
    serial = crop_dataset.crop_dataset(
        "cocostuff27", str(tmp_path / "serial"), "double", num_workers=0, progress=False
    )[0]
    parallel = crop_dataset.crop_dataset(
        "cocostuff27", str(tmp_path / "parallel"), "double", num_workers=2, progress=False
    )[0]
    assert os.path.basename(serial) == "cocostuff_double_crop_0"
    tree = _tree(serial)
    assert len(tree) == 2 * 3 * 20 and tree == _tree(parallel)


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as exit_info:
        crop_dataset.main(["--dataset", "cocostuff27", "--data_dir", missing, "--num_workers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "Traceback" not in err

    make_voc_train(tmp_path)
    _write(
        _label(31, 46, (0, 21), 0),
        os.path.join(tmp_path, "pascalvoc", "VOCdevkit", "VOC2012", "SegmentationClass", "2007_000039.png"),
    )
    with pytest.raises(SystemExit) as exit_info:
        crop_dataset.main(["--dataset", "pascalvoc", "--data_dir", str(tmp_path), "--num_workers", "2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2007_000039.png holds values outside the dataset's range: 21" in err
    crop_root = cropped_dir("pascalvoc", str(tmp_path))
    assert os.path.exists(incomplete_marker(crop_root, "train"))
    with pytest.raises(DatasetError, match="interrupted"):
        build_dataset("pascalvoc", str(tmp_path), "train", 16)

    with pytest.raises(DatasetError, match="only applies to --crop_type five"):
        crop_dataset.crop_dataset("pascalvoc", str(tmp_path), crop_ratio=0.3, progress=False)

    tiny = tmp_path / "tiny"
    make_voc_train(tiny, height=3, width=1)  # a 1-pixel-wide picture has no 0.3-size crop
    with pytest.raises(DatasetError, match=r"image .*\.jpg \(1x3\) is too small to crop at ratio 0\.3"):
        crop_dataset.crop_dataset("pascalvoc", str(tiny), progress=False)


def test_main_reports_the_crops_and_a_ctrl_c(tmp_path, monkeypatch, capsys):
    make_coco_train(tmp_path)
    argv = ["--dataset", "cocostuff27", "--data_dir", str(tmp_path), "--num_workers", "0"]
    crop_dataset.main(argv)
    crop_root = cropped_dir("cocostuff27", str(tmp_path))
    assert capsys.readouterr().out == f"15 crops in {crop_root} (15 written now, 0 already there)\n"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(crop_dataset, "crop_dataset", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        crop_dataset.main(argv)
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == (
        "crop_dataset.py: interrupted; the crops written so far are complete, rerun the same command to finish\n"
    )


def test_script_exits_with_code_2_and_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "crop_dataset.py", "--dataset", "cityscapes", "--data_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "leftImg8bit" in result.stderr


def test_help_documents_every_flag(capsys):
    actions = {action.dest: action.help for action in crop_dataset.build_parser()._actions}
    assert set(actions) == {"help", "dataset", "data_dir", "crop_type", "crop_ratio", "split", "num_workers"}
    assert all(text and len(text.split()) >= 3 for text in actions.values())
    with pytest.raises(SystemExit) as exit_info:
        crop_dataset.parse_args(["--help"])
    assert exit_info.value.code == 0 and "--num_workers" in capsys.readouterr().out
