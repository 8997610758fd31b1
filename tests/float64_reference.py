"""Independent float64 references for the statistics (numpy loops, no engine code)."""

import numpy as np


def topk_reference(a: np.ndarray, k: int) -> np.ndarray:
    """[N, D] bool: the k largest |a| per row, ties to the lower index (stable sort)."""
    order = np.argsort(-np.abs(a), axis=1, kind="stable")[:, :k]
    mask = np.zeros(a.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=1)
    return mask


def stats_reference(rows: dict[int, list], num_labels: int, width: int, k: int) -> dict[str, np.ndarray]:
    """rows: layer -> list of (activation vector float64 [D], label). Returns store-like arrays."""
    layers = sorted(rows)
    frames = np.zeros(num_labels, np.int64)
    topk = np.zeros((len(layers), num_labels, width), np.int64)
    positive = np.zeros_like(topk)
    sums = np.zeros((len(layers), num_labels, width))
    max_abs = np.full((len(layers), num_labels, width), np.nan)
    abs_sum = np.zeros((len(layers), num_labels, width))
    for li, layer in enumerate(layers):
        for vec, label in rows[layer]:
            if li == 0:
                frames[label] += 1
            topk[li, label] += topk_reference(vec[None], k)[0]
            positive[li, label] += vec > 0
            sums[li, label] += vec
            max_abs[li, label] = np.fmax(max_abs[li, label], np.abs(vec))
            abs_sum[li, label] += np.abs(vec)
    n = frames[None, :, None].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / n
        sq = np.zeros_like(sums)
        for li, layer in enumerate(layers):
            for vec, label in rows[layer]:
                sq[li, label] += (vec - mean[li, label]) ** 2
        var = sq / n
    return {
        "frames": frames,
        "topk_count": topk,
        "positive_count": positive,
        "mean": mean,
        "var": var,
        "max_abs": max_abs,
        "abs_sum": abs_sum,
    }


def phone_mid(phones: np.ndarray) -> list[int]:
    """Middle frame of every maximal run of identical labelled phones (written as a plain loop)."""
    out, start = [], 0
    for t in range(1, len(phones) + 1):
        if t == len(phones) or phones[t] != phones[start]:
            if phones[start] >= 0:
                out.append((start + t - 1) // 2)
            start = t
    return out


def count_slack(rows: dict[int, list], num_labels: int, width: int, k: int, delta: dict[int, float]) -> dict:
    """How far the counts of another evaluation of the same activations may be from ``stats_reference``'s
    when each activation of layer ``l`` may move by up to ``delta[l]`` (e.g. another CPU's fp32 rounding):
    per cell, the tokens at which the neuron's top-k membership or its sign could change.  A neuron's top-k
    membership is certain when its |a| clears the k-th / (k+1)-th largest |a| of its row by more than
    2·delta (both may move); its sign when |a| > delta."""
    layers = sorted(rows)
    topk = np.zeros((len(layers), num_labels, width), np.int64)
    positive = np.zeros_like(topk)
    for li, layer in enumerate(layers):
        d = delta[layer]
        for vec, label in rows[layer]:
            mag = np.abs(vec)
            ordered = np.sort(mag)[::-1]
            kth, next_ = ordered[k - 1], (ordered[k] if k < width else -np.inf)
            inside = topk_reference(vec[None], k)[0]
            surely = np.where(inside, mag - 2 * d > next_, mag + 2 * d < kth)
            topk[li, label] += ~surely
            positive[li, label] += mag <= d
    return {"topk_count": topk, "positive_count": positive}
