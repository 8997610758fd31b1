"""Pure-torch float64 references of the kernels, one home, written from the definitions (sorting, plain
sums, power sums) rather than from the kernels' algorithms, so that a test comparing the two can fail."""

from __future__ import annotations

import torch

ACTIVATIONS = {
    "gelu": torch.nn.functional.gelu,
    "relu": torch.relu,
    "gelu_new": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
    "gelu_pytorch_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"),
}


def topk_mask_reference(a: torch.Tensor, k: int) -> torch.Tensor:
    """[N, D] bool: the k largest |a| of each row, ties to the lower index (a stable sort)."""
    order = torch.sort(a.abs(), dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(a, dtype=torch.bool).scatter_(1, order, True)


def label_stats_reference(
    y: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, num_labels: int, k: int, shift: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``label_stats``' sums of the token rows ``y[rows]`` with labels ``labels`` (any order), in float64:
    top-k and positive counts (int64), s1 = Σ(a − shift), s2 = Σ(a − shift)² per label."""
    a = y.index_select(0, rows.long()).double()
    labels = labels.long()

    def per_label(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros((num_labels, a.shape[1]), dtype=torch.float64).index_add_(0, labels, values.double())

    dev = a - shift.double()
    return {
        "topk": per_label(topk_mask_reference(a, k)).long(),
        "positive": per_label(a > 0).long(),
        "s1": per_label(dev),
        "s2": per_label(dev * dev),
    }


def ffn_up_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str) -> torch.Tensor:
    """``ffn_up_stats``' y = act(x Wᵀ + b) in float64."""
    return ACTIVATIONS[activation](x.double() @ weight.double().T + bias.double())


def fold_reference(
    sums: dict[str, torch.Tensor],
    labels: torch.Tensor,
    counts: torch.Tensor,
    tokens: torch.Tensor,
    shift: torch.Tensor | None,
    totals: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``fold_sums``' result as new totals: counts added; the moments through power sums in float64
    (Σa and Σa² of the totals and of the batch added, then mean = Σa / n, M2 = Σa² − n·mean²)."""
    out = {name: t.clone() for name, t in totals.items()}
    rows = labels.long()
    for name in ("topk", "positive"):
        if name in out:
            out[name][rows] += sums[name].long()
    if "mean" in out:
        n_a = tokens[rows].double()[:, None]
        n_b = counts.double()[:, None]
        c = shift.double()[None]
        mean_a, m2_a = totals["mean"][rows], totals["m2"][rows]
        sum1 = n_a * mean_a + sums["s1"].double() + n_b * c
        sum2 = m2_a + n_a * mean_a**2 + sums["s2"].double() + 2 * c * sums["s1"].double() + n_b * c**2
        n = n_a + n_b
        out["mean"][rows] = sum1 / n
        out["m2"][rows] = sum2 - sum1**2 / n
    return out
