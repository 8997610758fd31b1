"""Moment arithmetic, one home: shifted sums → (mean, M2), Chan et al.'s pairwise merge, pooling.

Written with plain operators so that the same functions serve torch tensors (the engine, in float64)
and numpy arrays (merging and pooling stores).  ``M2`` is the sum of squared deviations from the mean.
"""

from __future__ import annotations


def from_shifted_sums(n, s1, s2, shift):
    """(mean, M2) of n values from s1 = Σ(a − shift) and s2 = Σ(a − shift)² (n > 0)."""
    offset = s1 / n
    return offset + shift, s2 - offset * offset * n


def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """(mean, M2) of the union of two disjoint sets (Chan, Golub and LeVeque); empty sets are fine."""
    n = n_a + n_b
    n_safe = n + (n == 0)
    delta = mean_b - mean_a
    return mean_a + delta * (n_b / n_safe), m2_a + m2_b + delta * delta * (n_a * n_b / n_safe)


def pool(n, mean, m2, axis: tuple[int, ...]):
    """(n, mean, M2) pooled over ``axis`` (kept as size-1 dims) of numpy arrays: many sets merged at once."""
    total = n.sum(axis=axis, keepdims=True)
    safe = total + (total == 0)
    pooled = (n * mean).sum(axis=axis, keepdims=True) / safe
    return total, pooled, (m2 + n * (mean - pooled) ** 2).sum(axis=axis, keepdims=True)
