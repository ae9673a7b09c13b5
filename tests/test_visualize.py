import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from utils.visualize import (
    CITYSCAPES_COLORS,
    colorize,
    colormap,
    dataset_colormap,
    plot_confusion,
    plot_losses,
    save_iou_table,
    save_panel,
)


def test_colormap_is_the_pascal_palette_and_distinct():
    cmap = colormap(27)
    assert cmap.shape == (27, 3) and cmap.dtype == np.uint8
    assert cmap[:9].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
        [0, 128, 128],
        [128, 128, 128],
        [64, 0, 0],
    ]
    assert cmap[15].tolist() == [192, 128, 128]  # VOC person
    assert cmap[20].tolist() == [0, 64, 128]  # VOC tv monitor
    assert len({tuple(c) for c in colormap(512)}) == 512
    with pytest.raises(ValueError, match="n_classes"):
        colormap(0)


def test_dataset_colormap():
    city = dataset_colormap("cityscapes", 27)
    assert city.shape == (27, 3)
    assert city[0].tolist() == [128, 64, 128]  # road, label id 7
    assert city[19].tolist() == [0, 0, 142]  # car, label id 26
    assert city[26].tolist() == [119, 11, 32]  # bicycle, label id 33
    assert len(CITYSCAPES_COLORS) == 27
    assert np.array_equal(dataset_colormap("cocostuff27", 27), colormap(27))
    with pytest.raises(ValueError, match="27 classes"):
        dataset_colormap("cityscapes", 19)


def test_colorize_draws_ignore_black_and_checks_range():
    cmap = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], dtype=np.uint8)
    label = torch.tensor([[0, 1], [-1, 2]])
    out = colorize(label, cmap)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out.tolist() == [[[10, 20, 30], [40, 50, 60]], [[0, 0, 0], [70, 80, 90]]]
    assert colorize(np.array([[-1]]), cmap, ignore_color=(255, 255, 255)).tolist() == [[[255, 255, 255]]]
    with pytest.raises(ValueError, match="outside the colour map of 3"):
        colorize(np.array([[3]]), cmap)


def test_save_panel_writes_the_pictures_at_native_resolution(tmp_path):
    rng = np.random.default_rng(0)
    height, width = 21, 30
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    gt = torch.from_numpy(rng.integers(-1, 6, (height, width)))
    cluster = rng.integers(0, 6, (height, width))
    cmap = colormap(6)
    path = tmp_path / "panels" / "0.png"
    save_panel(str(path), image, gt, cluster, cluster, cluster, cmap, gap=4, title_height=24)
    picture = np.array(Image.open(path).convert("RGB"))
    assert picture.shape == (height + 24, 5 * width + 4 * 4, 3)
    assert np.array_equal(picture[24:, :width], image)
    assert np.array_equal(picture[24:, width + 4 : 2 * width + 4], colorize(gt, cmap))
    assert np.array_equal(picture[24:, 4 * (width + 4) :], colorize(cluster, cmap))
    assert os.listdir(path.parent) == ["0.png"]


def test_save_panel_without_crf_map_has_four_pictures(tmp_path):
    image = np.zeros((10, 12, 3), np.uint8)
    label = np.zeros((10, 12), np.int64)
    path = tmp_path / "p.png"
    save_panel(path, image, label, label, None, label, colormap(2), gap=2, title_height=20)
    assert Image.open(path).size == (4 * 12 + 3 * 2, 30)
    with pytest.raises(ValueError, match="shape"):
        save_panel(path, image, label[:5], label, None, label, colormap(2))


def test_plot_losses_from_jsonl_and_list(tmp_path):
    records = [{"step": i, "epoch": 0, "loss": 1.0 / (i + 1), "loss_lin": 2.0 - 0.1 * i} for i in range(10)]
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "plots" / "losses.png"
    plot_losses(str(log), str(out))
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.size == (600, 440)  # two subplots: loss, loss_lin
    plot_losses(records, str(out), keys=["loss"])
    assert Image.open(out).size == (600, 220)
    log.write_text('{"step": 0, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        plot_losses(str(log), str(out))
    with pytest.raises(ValueError, match="no numeric values"):
        plot_losses([{"step": 1, "name": "x"}], str(out))


def test_plot_confusion(tmp_path):
    hist = torch.tensor([[5, 1, 0], [0, 3, 0], [2, 0, 0]])
    out = tmp_path / "confusion.png"
    plot_confusion(hist, ["a", "b", "c"], str(out))
    with Image.open(out) as picture:
        assert picture.format == "PNG" and picture.size == (500, 400)
    with pytest.raises(ValueError, match="C=2"):
        plot_confusion(hist, ["a", "b"], str(out))


def test_save_iou_table(tmp_path):
    path = tmp_path / "iou.md"
    text = save_iou_table([50.0, math.nan, 25.125], ["road", "sky", "car"], str(path))
    assert path.read_text() == text
    lines = text.splitlines()
    assert lines[0] == "| id | class | IoU (%) |"
    assert lines[2] == "| 0 | road | 50.00 |"
    assert lines[3] == "| 1 | sky | n/a |"
    assert lines[4] == "| 2 | car | 25.12 |"
    assert lines[5] == "| | **mean** | **37.56** |"
    with pytest.raises(ValueError, match="3 IoU values for 2"):
        save_iou_table([1.0, 2.0, 3.0], ["a", "b"], str(path))


def test_atomic_write_leaves_no_file_on_failure(tmp_path):
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError):
        save_panel(path, np.zeros((4, 4, 3), np.uint8), np.full((4, 4), 9), None, None, None, colormap(2))
    assert os.listdir(tmp_path) == []
