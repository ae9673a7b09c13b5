"""Shared fixtures: a tiny toy dataset on disk and a tiny DINO-format checkpoint."""

from pathlib import Path

import pytest

from loader.toy import ensure_toy
from tests._backbone_fixtures import make_fake_checkpoint


@pytest.fixture(scope="session")
def toy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("toydata")
    toy = Path(ensure_toy(str(root), n_train=16, n_val=8, size=96))
    return {
        "train": (toy / "train" / "images", toy / "train" / "labels"),
        "val": (toy / "val" / "images", toy / "val" / "labels"),
    }


@pytest.fixture(scope="session")
def dino_ckpt(tmp_path_factory):
    return str(
        make_fake_checkpoint(
            tmp_path_factory.mktemp("ckpt") / "dino_tiny8.pth", "dino", embed_dim=48, depth=2, patch_size=8, img_size=64
        )
    )
