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

from loader.netloader import atomic_np_save
from utils.atomic import atomic_write_bytes


def cache_key(args, backbone, split, resolution, dtype):
    """Everything that determines the tokens of one item, as a JSON-able dict."""
    ckpt = os.path.abspath(args.ckpt) if args.ckpt else None
    stat = os.stat(ckpt) if ckpt else None
    return {"ckpt": ckpt, "ckpt_size": stat.st_size if stat else None,
            "ckpt_mtime": stat.st_mtime if stat else None, "arch": None if ckpt else args.arch,
            "family": backbone.family, "num_heads": backbone.num_heads, "dataset": args.dataset,
            "data_dir": os.path.abspath(args.data_dir), "image_dir": args.image_dir, "split": split,
            "resolution": resolution, "mean": list(backbone.mean), "std": list(backbone.std), "dtype": str(dtype)}


class FeatureCache:
    """One folder of per-item token files for one configuration (see :func:`cache_key`)."""

    def __init__(self, root, key):
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(root, digest)
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
