"""ffn_up_stats against its torch reference (Triton interpreter on CPU, a GPU when present)."""

import pytest
import torch

from neurostat.engine.batching import chunk_tokens
from neurostat.kernels.ffn_up_stats import ffn_up_stats
from neurostat.kernels.reference import ffn_up_reference, label_stats_reference

U32 = torch.finfo(torch.float32).eps / 2


def y_bound(x, w, b, y_ref, dtype) -> torch.Tensor:
    """How far the kernel's y may be from the float64 reference: the fp32 accumulation of k + 1 products
    and the bias (each within (k + 1)·u·Σ|x w| + |b|, the products of halves exact in fp32) through an
    activation of slope below 1.13, the activation's own fp32 evaluation (within 16·u·(|y| + |x w + b|),
    as tests/test_precision.py states for GELU) and one rounding to ``dtype``."""
    terms = x.double().abs() @ w.double().abs().T + b.double().abs()
    u = torch.finfo(dtype).eps / 2
    return 1.13 * (x.shape[1] + 1) * U32 * terms + 16 * U32 * (y_ref.abs() + terms) + u * y_ref.abs()


def sums_bound(y, rows, labels, num_labels, shift) -> dict[str, torch.Tensor]:
    """SUM_BOUND of fp32 sums per label: (n + 1)·u·Σ|term| with n the label's tokens (the difference a − shift
    rounded once more), (n + 2)·u·Σ|term| for the squares (each rounded once more again)."""
    n = torch.bincount(labels.long(), minlength=num_labels).double()[:, None]
    dev = (y.double() - shift.double()).abs()
    absolute = label_stats_reference(dev, rows, labels, num_labels, 1, torch.zeros_like(shift))
    return {"s1": (n + 1) * U32 * absolute["s1"], "s2": (n + 2) * U32 * absolute["s2"]}


def _perm(labels: torch.Tensor):
    """Token rows sorted by label first, then every other row (what the engine passes)."""
    rows = torch.nonzero(labels >= 0).flatten()
    sorted_rows, sorted_labels, _, _ = chunk_tokens(rows, labels[rows])
    others = torch.nonzero(labels < 0).flatten().to(torch.int32)
    return torch.cat([sorted_rows, others]), sorted_labels, rows


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("m, k, n, num_labels", [(37, 19, 45, 5), (70, 33, 29, 3), (5, 8, 7, 2)])
def test_matches_reference(device, dtype, activation, m, k, n, num_labels):
    g = torch.Generator().manual_seed(m + 7 * k + n)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    labels = torch.randint(-1, num_labels, (m,), generator=g)
    labels[labels == 1] = -1  # label 1 has no tokens
    perm, sorted_labels, rows = _perm(labels)
    shift = torch.randn(n, generator=g) * 0.1
    y, sums = ffn_up_stats(
        x.to(device),
        w.to(device),
        b.to(device),
        activation,
        perm.to(device),
        sorted_labels.to(device),
        num_labels,
        shift.to(device),
    )
    y_ref = ffn_up_reference(x, w, b, activation)
    assert y.dtype == dtype
    assert ((y.cpu().double() - y_ref).abs() <= y_bound(x, w, b, y_ref, dtype)).all()
    # the epilogue statistics are exactly those of the y the kernel wrote
    ref = label_stats_reference(y.cpu(), rows, labels[rows], num_labels, 1, shift)
    assert torch.equal(sums["positive"].cpu().long(), ref["positive"])
    bound = sums_bound(y.cpu(), rows, labels[rows], num_labels, shift)
    for name in ("s1", "s2"):
        assert ((sums[name].cpu().double() - ref[name]).abs() <= bound[name]).all(), name
    assert sums["positive"][1].sum() == 0


def test_plain_mode_and_errors(device):
    x, w, b = torch.randn(9, 6), torch.randn(11, 6), torch.randn(11)
    perm = torch.arange(9, dtype=torch.int32)
    y, sums = ffn_up_stats(
        x.to(device),
        w.to(device),
        b.to(device),
        "gelu",
        perm.to(device),
        torch.empty(0, dtype=torch.int32, device=device),
        1,
        None,
        stats=False,
    )
    assert sums == {}
    y_ref = ffn_up_reference(x, w, b, "gelu")
    assert ((y.cpu().double() - y_ref).abs() <= y_bound(x, w, b, y_ref, torch.float32)).all()
    with pytest.raises(ValueError, match="no fused kernel"):
        ffn_up_stats(x, w, b, "swish", perm, perm, 1, None)
    with pytest.raises(ValueError, match="shapes do not match"):
        ffn_up_stats(x, w[:, :5].contiguous(), b, "gelu", perm, perm, 1, None)
