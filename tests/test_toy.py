import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from loader import toy
from loader.toy import MARKER, TOY_CLASS_NAMES, ensure_toy, parts_sample, toy_sample

TINY = dict(n_train=3, n_val=2, size=48)


def _files(toy_root):
    out = {}
    for split in ("train", "val"):
        for kind in ("images", "labels"):
            directory = os.path.join(toy_root, split, kind)
            for name in sorted(os.listdir(directory)):
                with open(os.path.join(directory, name), "rb") as f:
                    out[f"{split}/{kind}/{name}"] = f.read()
    return out


def test_same_seed_gives_identical_bytes(tmp_path):
    first = _files(ensure_toy(str(tmp_path / "a"), seed=3, **TINY))
    second = _files(ensure_toy(str(tmp_path / "b"), seed=3, **TINY))
    assert len(first) == 2 * (3 + 2) and first == second
    other = _files(ensure_toy(str(tmp_path / "c"), seed=4, **TINY))
    assert other.keys() == first.keys() and all(other[k] != first[k] for k in first if "/images/" in k)


def test_layout_and_values(tmp_path):
    toy_root = ensure_toy(str(tmp_path), seed=0, **TINY)
    assert toy_root == os.path.join(str(tmp_path), "toy")
    assert sorted(os.listdir(os.path.join(toy_root, "train", "images"))) == ["00000.png", "00001.png", "00002.png"]
    image = Image.open(os.path.join(toy_root, "val", "images", "00001.png"))
    label = Image.open(os.path.join(toy_root, "val", "labels", "00001.png"))
    assert image.mode == "RGB" and image.size == (48, 48)
    assert label.mode == "L" and label.size == (48, 48)
    assert np.array(label).max() < len(TOY_CLASS_NAMES)
    with open(os.path.join(toy_root, MARKER)) as f:
        assert json.load(f) == {"seed": 0, "n_classes": 6, **TINY}


def test_marker_controls_regeneration(tmp_path):
    toy_root = ensure_toy(str(tmp_path), seed=0, **TINY)
    probe = os.path.join(toy_root, "val", "images", "00000.png")
    original = open(probe, "rb").read()
    with open(probe, "wb") as f:
        f.write(b"edited")
    ensure_toy(str(tmp_path), seed=0, **TINY)
    assert open(probe, "rb").read() == b"edited"  # complete: nothing regenerated

    os.remove(os.path.join(toy_root, MARKER))  # as after an interrupted generation
    ensure_toy(str(tmp_path), seed=0, **TINY)
    assert open(probe, "rb").read() == original

    ensure_toy(str(tmp_path), seed=0, n_train=1, n_val=2, size=48)
    assert os.listdir(os.path.join(toy_root, "train", "images")) == ["00000.png"]
    assert sorted(os.listdir(os.path.join(toy_root, "train", "labels"))) == ["00000.png"]


def test_an_interrupted_regeneration_is_redone(tmp_path, monkeypatch):
    """Regenerating with other parameters drops the old marker first: stopped half-way, the folder is
    complete for neither set, and the old parameters regenerate it."""
    toy_root = ensure_toy(str(tmp_path), seed=0, **TINY)
    fresh = _files(toy_root)

    def interrupted(toy_root, split, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(toy, "_write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_toy(str(tmp_path), seed=5, **TINY)
    assert not os.path.exists(os.path.join(toy_root, MARKER))
    monkeypatch.undo()
    probe = os.path.join(toy_root, "val", "images", "00000.png")
    with open(probe, "wb") as f:
        f.write(b"half-written by the seed-5 run")
    assert _files(ensure_toy(str(tmp_path), seed=0, **TINY)) == fresh


@pytest.mark.parametrize(
    "sampler,digest",
    [
        (toy_sample, "36ee852be9c7a5a1d499153ca73f9278044024fb907743ba6c900dc23545f844"),
        (parts_sample, "b7f172f2286c9e29ba18442830eecbda4f649ffa0279394f8d88625c4d4eee51"),
    ],
)
def test_the_worlds_are_pinned(sampler, digest):
    """Every pixel and label of a sample is fixed by its seed (numpy's Generator streams are stable): the toy
    numbers in the README and the shipped toy backbone (weights/toy_vit_dino.json) were made from these."""
    image, label = sampler(np.random.default_rng([0, 1, 2]), 48, 6)
    assert hashlib.sha256(image.tobytes() + label.tobytes()).hexdigest() == digest


def test_every_class_appears_and_colour_alone_is_ambiguous():
    images, labels = zip(*(toy_sample(np.random.default_rng([0, 0, i]), 64, 6) for i in range(24)))
    labels = np.concatenate([label.ravel() for label in labels])
    pixels = np.concatenate([image.reshape(-1, 3) for image in images]).astype(np.int64)
    assert set(np.unique(labels)) == set(range(6))
    # best possible classifier from a pixel's (quantised) colour alone, fitted on the same pixels
    key = (pixels[:, 0] // 32) * 64 + (pixels[:, 1] // 32) * 8 + pixels[:, 2] // 32
    counts = np.zeros((512, 6))
    np.add.at(counts, (key, labels), 1)
    assert counts.max(1).sum() / len(labels) < 0.8


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="2..6 classes"):
        ensure_toy(str(tmp_path), n_classes=7)
    with pytest.raises(ValueError, match="size >= 16"):
        ensure_toy(str(tmp_path), size=8)
