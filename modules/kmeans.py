"""The k-means baseline: faiss spherical k-means with C clusters on frozen features."""

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def fit_kmeans(feats, n_clusters, seed=0, niter=20):
    """feats: [M, D] -> unit-norm centroids [C, D] (cosine k-means, faiss on CPU)."""
    x = np.ascontiguousarray(F.normalize(feats.float(), dim=1).cpu().numpy(), dtype=np.float32)
    if x.shape[0] < n_clusters:
        raise ValueError(f"k-means needs at least {n_clusters} feature vectors, got {x.shape[0]}")
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=niter, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    return F.normalize(torch.from_numpy(kmeans.centroids.copy()), dim=1)


def kmeans_scores(feats, centroids):
    """feats: [B, D, h, w], centroids: [C, D] -> cosine similarity [B, C, h, w]."""
    return torch.einsum("bdhw,cd->bchw", F.normalize(feats.float(), dim=1), centroids.to(feats.device))
