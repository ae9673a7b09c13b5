"""Trained-head files in the released CAUSE layout, written from freshly built tiny modules.

The fake DINO checkpoint of conftest.py has width 48 and patch 8; at 64 pixels the TR head has
an 8 x 8 query grid (64 queries). Flags of :func:`predict_flags` build the matching networks.
"""

from pathlib import Path

import numpy as np
import torch

from modules.segment import Cluster, SegmentMLP, SegmentTR

WIDTH, REDUCED, PROJECTION, CLASSES, CODEBOOK, RESOLUTION = 48, 8, 16, 6, 16, 64


def write_released_heads(folder, head, seed=0):
    """Writes ``segment_<head>.pth``, ``cluster_<head>.pth`` and ``modular.npy``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if head == "tr":
        segment = SegmentTR(WIDTH, REDUCED, PROJECTION, CLASSES, num_queries=(RESOLUTION // 8) ** 2)
    else:
        segment = SegmentMLP(WIDTH, REDUCED, PROJECTION, CLASSES)
    paths = {
        "segment": folder / f"segment_{head}.pth",
        "cluster": folder / f"cluster_{head}.pth",
        "codebook": folder / "modular.npy",
    }
    torch.save(segment.state_dict(), paths["segment"])
    torch.save(Cluster(WIDTH, REDUCED, CODEBOOK, CLASSES).state_dict(), paths["cluster"])
    np.save(paths["codebook"], np.random.default_rng(seed).standard_normal((CODEBOOK, WIDTH)).astype(np.float32))
    return paths


def head_flags(ckpt, head, paths, out):
    """Flags that build the networks of :func:`write_released_heads` and load them by path."""
    return [
        "--dataset",
        "folder",
        "--n_classes",
        str(CLASSES),
        "--ckpt",
        ckpt,
        "--head",
        head,
        "--num_codebook",
        str(CODEBOOK),
        "--projection_dim",
        str(PROJECTION),
        "--reduced_dim",
        str(REDUCED),
        "--train_resolution",
        str(RESOLUTION),
        "--test_resolution",
        str(RESOLUTION),
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--gpu",
        "0",
        "--cpu",
        "--out",
        str(out),
        "--segment",
        str(paths["segment"]),
        "--cluster",
        str(paths["cluster"]),
        "--codebook",
        str(paths["codebook"]),
    ]
