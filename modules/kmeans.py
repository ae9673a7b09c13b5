"""The k-means baseline: plain faiss k-means (L2) with C clusters on frozen features."""

import faiss
import numpy as np
import torch


def fit_kmeans(feats, n_clusters, seed=0, niter=20):
    """feats: [M, D] -> centroids [C, D] (Lloyd's k-means in faiss, on CPU)."""
    x = np.ascontiguousarray(feats.float().cpu().numpy(), dtype=np.float32)
    if x.shape[0] < n_clusters:
        raise ValueError(f"k-means needs at least {n_clusters} feature vectors, got {x.shape[0]}")
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, verbose=False)
    kmeans.train(x)
    return torch.from_numpy(kmeans.centroids.copy())


def kmeans_assign(feats, centroids):
    """feats: [B, D, h, w], centroids: [C, D] -> index of the nearest centroid (L2), [B, h, w]."""
    x = feats.float().permute(0, 2, 3, 1)
    return torch.cdist(x.reshape(-1, x.shape[-1]), centroids.to(x.device)).argmin(1).view(x.shape[:3])
