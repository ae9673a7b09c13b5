import faiss
import numpy as np
import pytest
import torch

from modules.kmeans import fit_kmeans, kmeans_assign


def blobs(n_per_blob=50, dim=4, seed=5):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])[:, :dim]
    points = centres.repeat_interleave(n_per_blob, 0) + 0.1 * torch.randn(3 * n_per_blob, dim, generator=gen)
    return points.double(), centres


def test_fit_kmeans_finds_the_blob_means():
    points, _ = blobs()
    # Lloyd's k-means can end in a local minimum; this data and seed 0 reach the global one.
    centroids = fit_kmeans(points, 3)
    assert centroids.dtype == torch.float32 and centroids.shape == (3, 4)
    means = points.float().view(3, 50, 4).mean(dim=1)
    # Each blob mean is matched by exactly one centroid.
    nearest = torch.cdist(means, centroids).argmin(dim=1)
    assert sorted(nearest.tolist()) == [0, 1, 2]
    torch.testing.assert_close(centroids[nearest], means, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed,niter", [(0, 20), (5, 2), (9, 1)])
def test_fit_kmeans_is_faiss_kmeans_with_its_seed_and_iterations(seed, niter):
    # Overlapping data, so the result depends on the seed and the number of iterations.
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(1))
    reference = faiss.Kmeans(3, 6, niter=niter, seed=seed, verbose=False)
    reference.train(np.ascontiguousarray(x.numpy(), dtype=np.float32))
    centroids = fit_kmeans(x, 6, seed=seed, niter=niter)
    assert torch.equal(centroids, torch.from_numpy(reference.centroids))
    if seed == 0 and niter == 20:
        assert torch.equal(fit_kmeans(x, 6), centroids)


def test_fit_kmeans_defaults_and_quiet(capfd):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(2))
    reference = faiss.Kmeans(3, 4, niter=20, seed=0)
    reference.train(x.numpy())
    capfd.readouterr()
    assert torch.equal(fit_kmeans(x, 4), torch.from_numpy(reference.centroids))
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_fit_kmeans_defaults_to_twenty_iterations_on_data_still_moving_after_them():
    # Uniform points: Lloyd's iterations keep moving the centroids past the 20th, so the
    # default number of iterations is visible in the result.
    x = torch.rand(1600, 8, generator=torch.Generator().manual_seed(0))
    centroids = {}
    for niter in (20, 21):
        reference = faiss.Kmeans(8, 16, niter=niter, seed=0, verbose=False)
        reference.train(x.numpy())
        centroids[niter] = torch.from_numpy(reference.centroids)
    assert not torch.allclose(centroids[20], centroids[21], atol=1e-3)
    assert torch.equal(fit_kmeans(x, 16), centroids[20])


def test_fit_kmeans_needs_as_many_vectors_as_clusters():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    assert fit_kmeans(x, 5).shape == (5, 3)
    with pytest.raises(ValueError, match="at least 6 feature vectors, got 5"):
        fit_kmeans(x, 6)


def test_kmeans_assign_is_the_nearest_centroid_of_every_pixel():
    gen = torch.Generator().manual_seed(4)
    feats = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    centroids = torch.randn(7, 3, generator=gen)
    expected = torch.empty(2, 4, 5, dtype=torch.long)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                distances = [float(((feats[b, :, i, j].float() - c) ** 2).sum()) for c in centroids]
                expected[b, i, j] = int(np.argmin(distances))
    assigned = kmeans_assign(feats, centroids)
    assert assigned.dtype == torch.long
    assert torch.equal(assigned, expected)
