"""Frozen backbone tokens cached on disk (``--feature_cache DIR``).

The backbone is frozen and the training transforms are deterministic (resize + center crop of pre-computed crops),
so the tokens of a dataset item never change within a configuration. They are stored once, one ``.npy`` per item,
under a folder named after a hash of everything that determines them (checkpoint file, architecture, dataset, split,
resolution, normalisation, dtype); later epochs and stages read them instead of running the backbone.
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
    """One folder of per-item token files for one configuration; ``key``: everything that determines the
    tokens of an item (checkpoint, architecture, dataset, split, resolution, normalisation, dtype), JSON-able."""

    def __init__(self, root, key):
        self.dir = cache_dir(root, key)
        key_path = os.path.join(self.dir, "key.json")
        if not os.path.isfile(key_path):  # also creates the folder
            atomic_write_bytes(key_path, json.dumps(key, indent=1, sort_keys=True).encode())

    @torch.no_grad()
    def tokens(self, backbone, img, ind):
        """img: [B, 3, H, W], ind: [B] dataset indices -> tokens [B, N, D] (cached or computed)."""
        paths = [os.path.join(self.dir, f"{i}.npy") for i in ind.tolist()]
        if all(os.path.isfile(p) for p in paths):
            return torch.from_numpy(np.stack([np.load(p) for p in paths])).to(img.device)
        tokens = backbone(img)
        for p, t in zip(paths, tokens.cpu().numpy()):
            if not os.path.isfile(p):
                atomic_np_save(t, p)
        return tokens


class TokenSource:
    """``tokens(img, ind)``: the frozen backbone's tokens, through the cache when there is one."""

    def __init__(self, backbone, cache=None):
        self.backbone, self.cache = backbone, cache

    @torch.no_grad()
    def __call__(self, img, ind):
        return self.backbone(img) if self.cache is None else self.cache.tokens(self.backbone, img, ind)
