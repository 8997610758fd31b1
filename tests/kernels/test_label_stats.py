"""label_stats against its float64 torch reference (Triton interpreter on CPU, a GPU when present)."""

import pytest
import torch

from neurostat.engine.batching import chunk_tokens
from neurostat.kernels.label_stats import TUNING, label_stats
from neurostat.kernels.reference import label_stats_reference


def run(y, rows, local, num_labels, k, shift=None, chunk=32, **which):
    """label_stats on token rows ``rows`` with local labels ``local``, through the engine's chunking."""
    work = (t.to(y.device) for t in chunk_tokens(rows, local, chunk))
    shift = None if shift is None else shift.to(y.device)
    return label_stats(y, *work, num_labels, k, shift, **which)


TUNINGS = {
    "rows1": {"search_rows": 1, "block_n": 16, "rows": 1},
    "rows2": {"search_rows": 2, "block_n": 8, "rows": 2},
    "rows4": {"search_rows": 4, "block_n": 32, "rows": 4},
}
"""Tunings that change which rows and columns share a program (and so the masking at the edges)."""


def tune(monkeypatch, tuning: str, two_pass: bool = False) -> None:
    for name, value in {**TUNINGS[tuning], "two_pass": two_pass}.items():
        monkeypatch.setitem(TUNING, name, value)


@pytest.mark.parametrize(
    "tuning, two_pass",
    [(name, False) for name in TUNINGS] + [("rows2", True)],
    ids=lambda v: {True: "two-pass", False: "atomic"}.get(v, v) if isinstance(v, bool) else v,
)
@pytest.mark.parametrize(
    "m, d, k, labels, chunk", [(7, 13, 3, 4, 2), (29, 37, 5, 6, 4), (40, 101, 11, 9, 32), (3, 5, 5, 2, 1)]
)
def test_matches_reference_with_ties_empty_labels_and_ignored_rows(
    device, dtype, two_pass, tuning, m, d, k, labels, chunk, monkeypatch
):
    tune(monkeypatch, tuning, two_pass)
    g = torch.Generator().manual_seed(m * 1000 + d)
    y = torch.randn(m, d, generator=g) * 2
    y[:, ::4] = torch.round(y[:, ::4])  # exact ties in |y|, some at the k-th value
    y[0] = torch.sign(torch.randn(d, generator=g))  # a row of ties only
    y[1] = 0.0
    y[1, : k // 2] = torch.randn(k // 2, generator=g)  # fewer than k non-zeros: zeros fill the top k
    y = y.to(dtype).to(device)
    token_labels = torch.randint(-1, labels, (m,), generator=g)
    token_labels[token_labels == 1] = 0  # label 1 stays empty
    rows = torch.nonzero(token_labels >= 0).flatten()
    local = token_labels[rows]
    shift = torch.randn(d, generator=g)
    got = run(y, rows, local, labels, k, shift, chunk)
    ref = label_stats_reference(y.cpu(), rows, local, labels, k, shift)
    assert (got["topk"].cpu().sum(1) == k * torch.bincount(local, minlength=labels)).all()
    for name in ("topk", "positive"):
        assert torch.equal(got[name].cpu().long(), ref[name]), name
    for name in ("s1", "s2"):
        torch.testing.assert_close(got[name].cpu().double(), ref[name], rtol=1e-5, atol=1e-4)
    assert got["topk"][1].sum() == 0 and got["s1"][1].abs().sum() == 0


@pytest.mark.parametrize("tuning", ["rows1", "rows4"])
def test_ties_at_the_threshold_go_to_the_lower_neuron(device, dtype, tuning, monkeypatch):
    """Rows whose k-th |a| is shared by more lanes than the top k has room for, and rows that share it
    exactly: the chosen lanes are the lower indices, as in the reference."""
    tune(monkeypatch, tuning)
    d, k = 23, 6
    y = torch.zeros(5, d)
    y[0] = 1.0  # all tied: lanes 0..5
    y[1, [3, 9, 20]] = 4.0
    y[1, [2, 5, 11, 17, 22]] = -2.0  # three above, five tied at |a| = 2 for three places
    y[2, :k] = torch.arange(1.0, k + 1)  # no tie at all
    y[3, [1, 4, 7, 10, 13, 16]] = 0.5  # exactly k tied lanes: all taken
    y[4] = -torch.arange(d, dtype=torch.float32).remainder(3)  # |a| = 2 at every third lane
    y = y.to(dtype).to(device)
    rows, local = torch.arange(5), torch.tensor([0, 1, 2, 3, 4])
    got = run(y, rows, local, 5, k, topk=True, positive=False, moments=False)["topk"].cpu().bool()
    ref = label_stats_reference(y.cpu(), rows, local, 5, k, torch.zeros(d))["topk"].bool()
    assert torch.equal(got, ref)
    assert got[0, :k].all() and torch.equal(torch.nonzero(got[1]).flatten(), torch.tensor([2, 3, 5, 9, 11, 20]))


def test_wide_dynamic_range_and_signed_zeros(device, dtype):
    """Every exponent the dtype has, subnormals and −0.0 among the lanes: the bitwise search over the key's
    bits finds the k-th |a| exactly wherever it falls."""
    g = torch.Generator().manual_seed(11)
    info = torch.finfo(dtype)
    m, d, k = 9, 67, 7
    exponents = torch.randint(int(torch.log2(torch.tensor(info.smallest_normal))) - 6, 14, (m, d), generator=g)
    y = torch.sign(torch.randn(m, d, generator=g)) * torch.rand(m, d, generator=g) * 2.0 ** exponents.float()
    y[2, :20] = -0.0
    y[3] = info.tiny * torch.arange(d) / 4  # subnormal and tiny normal magnitudes only
    y = y.to(dtype).to(device)
    rows, local = torch.arange(m), torch.randint(0, 3, (m,), generator=g)
    got = run(y, rows, local, 3, k, topk=True, positive=True, moments=False)
    ref = label_stats_reference(y.cpu(), rows, local, 3, k, torch.zeros(d))
    for name in ("topk", "positive"):
        assert torch.equal(got[name].cpu().long(), ref[name]), name


@pytest.mark.parametrize("two_pass", [False, True], ids=["atomic", "two-pass"])
def test_subsets_and_no_tokens(device, two_pass, monkeypatch):
    tune(monkeypatch, "rows1", two_pass)
    y = torch.randn(6, 9).to(device)
    rows, local = torch.tensor([0, 2, 5]), torch.tensor([1, 0, 1])
    got = run(y, rows, local, 2, 3, topk=True, positive=False, moments=False)
    assert set(got) == {"topk"} and got["topk"].sum() == 9
    got = run(y, rows, local, 2, 3, torch.zeros(9), topk=False, positive=True, moments=True)
    ref = label_stats_reference(y.cpu(), rows, local, 2, 3, torch.zeros(9))
    assert set(got) == {"positive", "s1", "s2"} and torch.equal(got["positive"].cpu().long(), ref["positive"])
    none = torch.tensor([], dtype=torch.long)
    got = run(y, none, none, 2, 3, torch.zeros(9))
    assert set(got) == {"topk", "positive", "s1", "s2"} and all(
        v.shape == (2, 9) and v.sum() == 0 for v in got.values()
    )
    with pytest.raises(ValueError, match="k <= D"):
        run(y, rows, local, 2, 10, moments=False)
    with pytest.raises(ValueError, match="shift"):
        run(y, rows, local, 2, 3)
