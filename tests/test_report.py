"""report.html: written by test.py, self-contained, and rendered by a real browser (headless Chromium)."""

import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import test as test_stage
from engine.report import SECTIONS, STAGES, iou_chart, render_report
from tests._released_heads import head_flags, write_released_heads
from tests._stage_flags import dataset_dir, parse

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
N_EXAMPLES = 2


def write_stage_logs(run_dir, mediator_dir):
    """Stage logs as the training scripts write them: ``<stage>.jsonl`` in their log folders."""
    for folder, stage in ((mediator_dir, "mediator"), (run_dir, "front_door"), (run_dir, "fine_tuning")):
        folder.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps({"step": s, "epoch": 0, "loss": 1.0 / (s + 1)}) for s in range(10)]
        (folder / f"{stage}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def report(tmp_path_factory, toy_dirs, dino_ckpt):
    """One tiny test.py run (released-layout heads by path, CRF, k-means baselines, stage logs)."""
    root = tmp_path_factory.mktemp("report")
    paths = write_released_heads(root / "heads", "mlp")
    out = root / "CAUSE"
    images, labels = toy_dirs["val"]
    data = dataset_dir(out, images)
    write_stage_logs(data / "dino_tiny8" / "16" / "mlp", data / "modularity" / "dino_tiny8" / "16")
    test_stage.main(
        parse(
            test_stage,
            head_flags(dino_ckpt, "mlp", paths, out)
            + [
                "--image_dir",
                str(images),
                "--label_dir",
                str(labels),
                "--crf_workers",
                "0",
                "--save_images",
                str(N_EXAMPLES),
            ],
        )
    )
    run = data / "dino_tiny8" / "16" / "mlp"
    return run / "report.html", json.loads((run / "metrics.json").read_text())


def browser():
    """The headless browser the report is rendered in; test.sh installs Chromium where it can."""
    found = [path for path in map(shutil.which, BROWSERS) if path]
    assert found, "no headless Chromium on PATH: install it (Debian: sudo apt-get install chromium), then rerun"
    return found[0]


def test_report_is_self_contained_with_every_section(report):
    path, metrics = report
    page = path.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    sources = re.findall(r'src="([^"]*)"', page)
    # iou chart, confusion matrix, one loss picture per stage, the examples
    assert len(sources) == 1 + 1 + len(STAGES) + N_EXAMPLES
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "stage 3 protocol unknown" in page  # released heads by path: no config_fine_tuning.json
    for title in ("CAUSE (cluster probe)", "CAUSE + CRF", "linear probe", "k-means on backbone tokens"):
        assert title in page
    assert f"{metrics['cluster_crf']['mIoU']:.2f}" in page
    assert f"clusters receiving pixels: {metrics['clusters_used']}/6" in page


def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _ = report
    chromium = browser()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom.stdout, section
    assert dom.stdout.count("<img") == 1 + 1 + len(STAGES) + N_EXAMPLES
    shot = tmp_path / "report.png"
    res = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2400, 1200)
    assert pixels.std() > 20  # text, tables and pictures, not a blank page
    assert (pixels < 128).mean() > 0.01


def bar_pixels(png):
    """Mask of the chart's bar colour (#4a7ab5) in a PNG."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return np.abs(rgb - [0x4A, 0x7A, 0xB5]).sum(-1) < 30


def test_iou_chart_draws_one_bar_per_class_first_on_top():
    full, empty = bar_pixels(iou_chart([100.0, 0.0], ["a", "b"])), bar_pixels(iou_chart([0.0, 0.0], ["a", "b"]))
    assert not empty.any() and full.sum() > 1000
    rows = np.nonzero(full.any(1))[0]
    assert rows.max() < full.shape[0] / 2  # the first class's bar is the upper one
    many = Image.open(io.BytesIO(iou_chart([50.0, float("nan"), 10.0] * 10, [str(i) for i in range(30)])))
    assert many.size[1] > Image.open(io.BytesIO(iou_chart([1.0], ["a"]))).size[1]  # taller with more classes


def test_a_missing_stage_log_is_said_not_hidden(tmp_path):
    result = {
        "dataset": "toy",
        "head": "mlp",
        "backbone": "b",
        "n_classes": 2,
        "clusters_used": 1,
        "class_names": ["a", "b"],
        "cluster": {"mIoU": 50.0, "pAcc": 60.0, "iou": [100.0, float("nan")]},
    }
    page = render_report({"seed": 0}, result, None, [], [str(tmp_path)])
    for stage in STAGES:
        assert f"no {stage}.jsonl log found" in page
    assert "no examples" in page and "no confusion matrix" in page and "<th>seed</th>" in page
