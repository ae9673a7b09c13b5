"""Frozen backbone tokens cached on disk (``--feature_cache DIR``).

The backbone is frozen and the training transforms are deterministic (resize + center crop of
pre-computed crops), so the tokens of a dataset item never change within a configuration.
They are stored once, one ``.npy`` per item, under a folder named after a hash of everything
that determines them (checkpoint file, architecture, dataset, split, resolution,
normalisation, dtype); later epochs and stages read them instead of running the backbone.
"""

import hashlib
import json
import os

import numpy as np
import torch

from utils.atomic import atomic_np_save, atomic_write_bytes


def cache_dir(root, key):
    """The folder of one configuration's tokens: ``root/<hash of key>``."""
    return os.path.join(root, hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16])


class FeatureCache:
    """One folder of per-item token files for one configuration.

    ``key``: everything that determines the tokens of an item (checkpoint, architecture,
    dataset, split, resolution, normalisation, dtype) as a JSON-able dict.
    """

    def __init__(self, root, key):
        self.dir = cache_dir(root, key)
        os.makedirs(self.dir, exist_ok=True)
        key_path = os.path.join(self.dir, "key.json")
        if not os.path.isfile(key_path):
            atomic_write_bytes(key_path, json.dumps(key, indent=1, sort_keys=True).encode())

    def path(self, ind):
        return os.path.join(self.dir, f"{ind}.npy")

    def tokens(self, backbone, img, ind):
        """img: [B, 3, H, W], ind: [B] dataset indices -> tokens [B, N, D] (cached or computed)."""
        paths = [self.path(i) for i in ind.tolist()]
        if all(os.path.isfile(p) for p in paths):
            return torch.from_numpy(np.stack([np.load(p) for p in paths])).to(img.device)
        with torch.no_grad():
            tokens = backbone(img)
        for p, t in zip(paths, tokens.cpu().numpy()):
            if not os.path.isfile(p):
                atomic_np_save(t, p)
        return tokens


class TokenSource:
    """``tokens(img, ind)``: the frozen backbone's tokens, through the cache when there is one."""

    def __init__(self, backbone, cache=None):
        self.backbone = backbone
        self.cache = cache

    def __call__(self, img, ind):
        if self.cache is None:
            with torch.no_grad():
                return self.backbone(img)
        return self.cache.tokens(self.backbone, img, ind)
