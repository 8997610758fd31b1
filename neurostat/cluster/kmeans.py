"""k-means in torch (k-means++ seeding, Lloyd iterations), on whatever device the features are on.

Used by ``neurostat cluster`` to turn SSL features (per frame) or utterance embeddings into label
sets.  Deterministic for a seed; an emptied cluster is re-seeded with the point farthest from its
centroid, so every run ends with k non-empty clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # [k, H]
    inertia: float  # sum of squared distances of the fitted points to their centroids
    iterations: int


def _sq_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None]).clamp_min_(0)


def assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x`` and its squared distance (chunked to bound memory)."""
    labels, dists = [], []
    c = centroids.to(x.dtype)
    for start in range(0, x.shape[0], chunk):
        d = _sq_distances(x[start : start + chunk], c)
        best = d.min(1)
        labels.append(best.indices)
        dists.append(best.values)
    if not labels:
        return torch.empty(0, dtype=torch.long, device=x.device), torch.empty(0, dtype=x.dtype, device=x.device)
    return torch.cat(labels), torch.cat(dists)


def _plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    first = torch.randint(x.shape[0], (1,), generator=generator).item()
    centroids = [x[first]]
    closest = _sq_distances(x, x[first : first + 1])[:, 0]
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:
            raise ValueError(f"k-means: fewer than {k} distinct points; choose fewer clusters")
        pick = torch.multinomial((closest / total).double().cpu(), 1, generator=generator).item()
        centroids.append(x[pick])
        closest = torch.minimum(closest, _sq_distances(x, x[pick : pick + 1])[:, 0])
    return torch.stack(centroids)


def kmeans(x: torch.Tensor, k: int, iterations: int = 100, seed: int = 0, tol: float = 1e-6) -> KMeansResult:
    """Fits k centroids to the rows of ``x`` [N, H] (float32/float64)."""
    if x.ndim != 2:
        raise ValueError(f"k-means needs a 2-D [points, features] array, got shape {tuple(x.shape)}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k-means: need 1 <= clusters <= points, got {k} clusters for {x.shape[0]} points")
    x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    generator = torch.Generator().manual_seed(seed)
    centroids = _plus_plus(x, k, generator)
    scale = float((x * x).sum(1).mean()) or 1.0
    done = 0
    for done in range(1, iterations + 1):
        labels, dists = assign(x, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        sizes = torch.bincount(labels, minlength=k)
        new = sums / sizes.clamp_min(1)[:, None].to(x.dtype)
        empty = torch.nonzero(sizes == 0).flatten()
        if empty.numel():
            far = torch.argsort(dists, descending=True)[: empty.numel()]
            new[empty] = x[far]
        shift = float(((new - centroids) ** 2).sum(1).max())
        centroids = new
        if shift <= tol * scale and not empty.numel():
            break
    labels, _ = assign(x, centroids)
    inertia = float(((x - centroids[labels]).double() ** 2).sum())
    return KMeansResult(centroids, inertia, done)
