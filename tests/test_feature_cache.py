"""--feature_cache: cached frozen tokens are the backbone's, and a cached run trains identically."""

import numpy as np
import torch

import train_mediator
from loader.feature_cache import FeatureCache, TokenSource
from tests._stage_flags import dataset_dir, flags, parse


class CountingBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, img):
        self.calls += 1
        return img.flatten(2).transpose(1, 2)[:, :, :2] * 3.0


def test_tokens_are_computed_once_then_read(tmp_path):
    backbone = CountingBackbone()
    source = TokenSource(backbone, FeatureCache(str(tmp_path), {"resolution": 4}))
    img, ind = torch.randn(3, 3, 4, 4), torch.tensor([5, 7, 9])
    first = source(img, ind)
    second = source(img, ind)
    assert backbone.calls == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert sorted(p.name for p in next(tmp_path.iterdir()).iterdir()) == ["5.npy", "7.npy", "9.npy", "key.json"]
    # A new item in the batch means one more backbone call; another configuration, another folder.
    source(img, torch.tensor([5, 7, 11]))
    assert backbone.calls == 2
    other = FeatureCache(str(tmp_path), {"resolution": 8})
    assert other.dir != source.cache.dir


def test_cached_stage_trains_exactly_like_uncached(tmp_path, toy_dirs, dino_ckpt):
    codebooks = []
    for name, extra in (("plain", []), ("cached", ["--feature_cache", str(tmp_path / "cache")])):
        out = tmp_path / name
        argv = flags(out, dino_ckpt, toy_dirs["train"], "mlp", ["--epoch", "2", *extra], resolution=96)
        train_mediator.main(parse(train_mediator, argv))
        codebooks.append(
            np.load(dataset_dir(out, toy_dirs["train"][0]) / "modularity" / "dino_tiny8" / "16" / "modular.npy")
        )
    np.testing.assert_array_equal(codebooks[0], codebooks[1])
    cached = list((tmp_path / "cache").rglob("*.npy"))
    assert len(cached) == 16
