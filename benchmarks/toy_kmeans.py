"""k-means baseline on the toy dataset: the figure quoted in the README.

Features: patch tokens of a randomly initialised ``vit_tiny_patch16_224`` (timm, weights
drawn after ``torch.manual_seed(seed)``), i.e. ``forward_features`` (after the final
LayerNorm) without the CLS token, raw (not L2-normalised), on the toy val images at 224
(shorter side resized with nearest interpolation, center crop, ImageNet normalisation).
Clusters: ``faiss.Kmeans(d, C, niter=20, seed=seed)`` fitted on all val tokens; every token
takes its nearest centroid; the 14x14 cluster map is upsampled with nearest interpolation
to the 224x224 label; one Hungarian assignment over the whole val set scores it.

    python benchmarks/toy_kmeans.py --data_dir data
"""

import argparse
import json
import os
import sys

import faiss
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loader.datasets import DATA_ERRORS, build_dataset  # noqa: E402
from utils.metrics import UnsupervisedMetrics  # noqa: E402


@torch.no_grad()
def patch_tokens(model, loader):
    """-> tokens float32 [M, N, D], labels int64 [M, H, W] for the M images of ``loader``."""
    tokens, labels = [], []
    for batch in loader:
        features = model.forward_features(batch["img"])
        tokens.append(features[:, model.num_prefix_tokens:])
        labels.append(batch["label"])
    return torch.cat(tokens), torch.cat(labels)


def kmeans_predict(tokens: torch.Tensor, n_clusters: int, seed: int, niter: int = 20) -> torch.Tensor:
    """tokens: [M, N, D] -> cluster id per token [M, N] (faiss k-means on all M*N tokens)."""
    flat = np.ascontiguousarray(tokens.reshape(-1, tokens.shape[-1]).numpy(), dtype=np.float32)
    kmeans = faiss.Kmeans(flat.shape[1], n_clusters, niter=niter, seed=seed)
    kmeans.train(flat)
    _, assign = kmeans.index.search(flat, 1)
    return torch.from_numpy(assign.reshape(tokens.shape[:2])).long()


def upsample_clusters(clusters: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """clusters: [M, N] on a square h x h grid -> [M, H, W], nearest interpolation."""
    side = int(round(clusters.shape[1] ** 0.5))
    grid = clusters.reshape(-1, 1, side, side).float()
    return F.interpolate(grid, size=size, mode="nearest").squeeze(1).long()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", default="data", help="where toy/ lives (generated if missing)")
    parser.add_argument("--arch", default="vit_tiny_patch16_224", help="timm ViT, random weights")
    parser.add_argument("--resolution", type=int, default=224, help="input resolution")
    parser.add_argument("--seed", type=int, default=0, help="seed of the ViT weights and of k-means")
    parser.add_argument("--batch_size", type=int, default=25, help="images per forward pass")
    args = parser.parse_args()

    try:
        dataset = build_dataset("toy", args.data_dir, "val", args.resolution)
    except DATA_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    torch.manual_seed(args.seed)
    model = timm.create_model(args.arch, pretrained=False).eval()
    tokens, labels = patch_tokens(model, DataLoader(dataset, args.batch_size, shuffle=False))
    clusters = kmeans_predict(tokens, dataset.n_classes, args.seed)
    pred = upsample_clusters(clusters, labels.shape[-2:])
    metrics = UnsupervisedMetrics(dataset.n_classes)
    metrics.update(pred, labels)
    scores = metrics.compute()
    print(json.dumps({"dataset": "toy", "split": "val", "images": len(dataset), "arch": args.arch,
                      "seed": args.seed, "kmeans": {"mIoU": round(float(scores["mIoU"]), 2),
                                                    "pAcc": round(float(scores["pAcc"]), 2)}}))


if __name__ == "__main__":
    main()
