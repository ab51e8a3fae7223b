"""The k-means variants the initialisations use: k-means++ seeding (Arthur & Vassilvitskii 2007),
balanced k-means (equal-size clusters, for the neuron split of the experts) and spherical k-means (cosine
similarity on unit vectors, for the hidden-state router). Pure functions of tensors and a generator.
"""

from __future__ import annotations

import torch


def kmeans_pp(x_ND: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): (k, D) centroids drawn from the points, spread out."""
    N = x_ND.shape[0]
    chosen = [int(torch.randint(N, (1,), generator=generator))]
    d2_N = ((x_ND - x_ND[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        if float(d2_N.sum()) > 0:
            nxt = int(torch.multinomial(d2_N, 1, generator=generator))
        else:  # every point coincides with a centroid: duplicates are unavoidable
            nxt = int(torch.randint(N, (1,), generator=generator))
        chosen.append(nxt)
        d2_N = torch.minimum(d2_N, ((x_ND - x_ND[nxt]) ** 2).sum(dim=1))
    return x_ND[chosen].clone()


def balanced_kmeans(x_ND: torch.Tensor, k: int, generator: torch.Generator, iters: int = 25) -> torch.Tensor:
    """Balanced k-means: Lloyd iterations whose assignment step gives every cluster exactly N / k points, greedily
    by increasing distance (N divisible by k).

    Args:
        x_ND: points, (N, D) float32.
    Returns:
        labels (N,) int64 in [0, k), each value exactly N / k times.
    """
    N = x_ND.shape[0]
    capacity = N // k
    centroids = kmeans_pp(x_ND, k, generator)
    labels = torch.full((N,), -1, dtype=torch.long)
    for _ in range(iters):
        dist_NK = torch.cdist(x_ND, centroids)
        new = torch.full((N,), -1, dtype=torch.long)
        load = [0] * k
        for flat in torch.argsort(dist_NK.reshape(-1), stable=True).tolist():
            i, c = divmod(flat, k)
            if new[i] < 0 and load[c] < capacity:
                new[i] = c
                load[c] += 1
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.zeros_like(centroids).index_add_(0, labels, x_ND) / capacity
    return labels


def spherical_kmeans(z_ND: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Spherical k-means (cosine similarity) with k-means++ seeding on unit vectors; an empty cluster keeps its
    previous centroid.

    Args:
        z_ND: unit vectors (N, D). Returns: unit centroids (k, D).
    """
    centroids = kmeans_pp(z_ND, k, generator)
    for _ in range(iters):
        labels = (z_ND @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, z_ND)
        counts = torch.bincount(labels, minlength=k)
        new = torch.where(counts[:, None] > 0, torch.nn.functional.normalize(sums, dim=1), centroids)
        if torch.allclose(new, centroids, atol=1e-7):
            break
        centroids = new
    return centroids
