"""fold_sums against its float64 power-sum reference (Triton interpreter on CPU, a GPU when present)."""

import pytest
import torch

from neurostat.kernels.fold_sums import fold_sums
from neurostat.kernels.reference import fold_reference


def state(num_labels, d, g, empty):
    """Totals after some earlier batches; labels in ``empty`` have no tokens yet (all zero)."""
    tokens = torch.randint(1, 50, (num_labels,), generator=g)
    tokens[empty] = 0
    totals = {
        "topk": torch.randint(0, 30, (num_labels, d), generator=g),
        "positive": torch.randint(0, 30, (num_labels, d), generator=g),
        "mean": torch.randn(num_labels, d, generator=g, dtype=torch.float64) * 3,
        "m2": torch.rand(num_labels, d, generator=g, dtype=torch.float64) * tokens[:, None],
    }
    for t in totals.values():
        t[empty] = 0
    return tokens, totals


@pytest.mark.parametrize("which", [("topk", "positive", "moments"), ("topk",), ("moments",), ("positive", "moments")])
@pytest.mark.parametrize("num_labels, d, batch_labels", [(7, 37, [5, 0, 3]), (4, 13, [0, 1, 2, 3]), (9, 16, [8])])
def test_matches_reference(device, which, num_labels, d, batch_labels):
    g = torch.Generator().manual_seed(num_labels * 100 + d)
    tokens, totals = state(num_labels, d, g, empty=[batch_labels[0], num_labels - 1])
    totals = {n: t for n, t in totals.items() if n in which or (n in ("mean", "m2") and "moments" in which)}
    labels = torch.tensor(batch_labels)
    counts = torch.randint(1, 40, (len(batch_labels),), generator=g)
    sums = {
        "topk": torch.randint(0, 20, (len(batch_labels), d), generator=g, dtype=torch.int32),
        "positive": torch.randint(0, 20, (len(batch_labels), d), generator=g, dtype=torch.int32),
    }
    shift = torch.randn(d, generator=g)
    sums["s1"] = (torch.randn(len(batch_labels), d, generator=g) * counts[:, None]).float()
    sums["s2"] = (sums["s1"].double() ** 2 / counts[:, None] + torch.rand(len(batch_labels), d, generator=g)).float()
    sums = {n: t for n, t in sums.items() if n in which or (n in ("s1", "s2") and "moments" in which)}
    expected = fold_reference(sums, labels, counts, tokens, shift, totals)
    got = {n: t.clone().to(device) for n, t in totals.items()}
    fold_sums(
        {n: t.to(device) for n, t in sums.items()},
        labels.to(device),
        counts.to(device),
        tokens.to(device),
        shift.to(device),
        got,
    )
    assert set(got) == set(expected)
    for name, value in got.items():
        if name in ("topk", "positive"):
            assert torch.equal(value.cpu(), expected[name]), name
        else:
            torch.testing.assert_close(value.cpu(), expected[name], rtol=1e-9, atol=1e-9)
    untouched = [i for i in range(num_labels) if i not in batch_labels]
    for name, value in got.items():
        assert torch.equal(value.cpu()[untouched], totals[name][untouched]), name


def test_refuses_wrong_buffers(device):
    labels, counts, tokens = torch.tensor([0]), torch.tensor([3]), torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="int64"):
        fold_sums(
            {"topk": torch.zeros(1, 5, dtype=torch.int32)}, labels, counts, tokens, None, {"topk": torch.zeros(2, 5)}
        )
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        fold_sums(
            {"topk": torch.zeros(2, 5, dtype=torch.int32)},
            labels,
            counts,
            tokens,
            None,
            {"topk": torch.zeros(2, 5, dtype=torch.int64)},
        )
