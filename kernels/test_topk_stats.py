"""topk_stats against its float64 torch reference (Triton interpreter on CPU, a GPU when present)."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from neurostat.engine.accumulate import chunk_tokens  # noqa: E402
from neurostat.kernels.topk_stats import TUNING, topk_stats, topk_stats_reference, topk_thresholds  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("two_pass", [False, True], ids=["atomic", "two-pass"])
@pytest.mark.parametrize("rows_per_step", [(1, 2, 1), (2, 1, 2), (4, 4, 2)])
@pytest.mark.parametrize(
    "m, d, k, labels, chunk", [(7, 13, 3, 4, 2), (29, 37, 5, 6, 4), (40, 101, 11, 9, 32), (3, 5, 5, 2, 1)]
)
def test_matches_reference_with_ties_empty_labels_and_ignored_rows(
    dtype, two_pass, rows_per_step, m, d, k, labels, chunk, monkeypatch
):
    monkeypatch.setitem(TUNING, "two_pass", two_pass)
    monkeypatch.setitem(TUNING, "rows", rows_per_step[0])
    monkeypatch.setitem(TUNING, "search_rows", rows_per_step[1])
    monkeypatch.setitem(TUNING, "search_bits", rows_per_step[2])
    g = torch.Generator().manual_seed(m * 1000 + d)
    y = torch.randn(m, d, generator=g) * 2
    y[:, ::4] = torch.round(y[:, ::4])  # exact ties in |y|, some at the k-th value
    y[0] = torch.sign(torch.randn(d, generator=g))  # a row of ties only
    y = y.to(dtype).to(DEVICE)
    token_labels = torch.randint(-1, labels, (m,), generator=g)
    token_labels[token_labels == 1] = 0  # label 1 stays empty
    rows = torch.nonzero(token_labels >= 0).flatten()
    local = token_labels[rows]
    shift = torch.randn(d, generator=g)
    sorted_rows, starts, chunk_labels = chunk_tokens(rows, local, chunk)
    assert ((starts[1:] - starts[:-1]) <= chunk).all()
    got = topk_stats(y, sorted_rows.to(DEVICE), starts.to(DEVICE), chunk_labels.to(DEVICE), labels, k, shift.to(DEVICE))
    ref = topk_stats_reference(y.cpu(), rows, local, labels, k, shift)
    assert (got["topk"].cpu().sum(1) == k * torch.bincount(local, minlength=labels)).all()
    for name in ("topk", "positive"):
        assert torch.equal(got[name].cpu().long(), ref[name]), name
    for name in ("s1", "s2"):
        torch.testing.assert_close(got[name].cpu().double(), ref[name], rtol=1e-5, atol=1e-4)
    assert got["topk"][1].sum() == 0 and got["s1"][1].abs().sum() == 0


@pytest.mark.parametrize("two_pass", [False, True], ids=["atomic", "two-pass"])
def test_subsets_and_no_tokens(two_pass, monkeypatch):
    monkeypatch.setitem(TUNING, "two_pass", two_pass)
    y = torch.randn(6, 9).to(DEVICE)
    rows, starts, labels = chunk_tokens(torch.tensor([0, 2, 5]), torch.tensor([1, 0, 1]), 8)
    got = topk_stats(
        y, rows.to(DEVICE), starts.to(DEVICE), labels.to(DEVICE), 2, 3, topk=True, positive=False, moments=False
    )
    assert set(got) == {"topk"} and got["topk"].sum() == 9
    empty = chunk_tokens(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    got = topk_stats(y, *(t.to(DEVICE) for t in empty), 2, 3, torch.zeros(9, device=DEVICE))
    assert all(v.sum() == 0 for v in got.values())
    with pytest.raises(ValueError, match="k <= D"):
        topk_stats(y, rows.to(DEVICE), starts.to(DEVICE), labels.to(DEVICE), 2, 10, topk=True, moments=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("bits", [1, 2])
def test_thresholds_are_the_kth_largest_and_can_be_reused(dtype, bits, monkeypatch):
    monkeypatch.setitem(TUNING, "search_bits", bits)
    g = torch.Generator().manual_seed(5)
    m, d, k = 23, 45, 7
    y = torch.round(torch.randn(m, d, generator=g) * 3) / 2  # many exact ties
    y = y.to(dtype).to(DEVICE)
    rows = torch.tensor([3, 0, 22, 7, 7, 11], dtype=torch.int32)
    thr, room = topk_thresholds(y, rows.to(DEVICE), k)
    absx = y.cpu().float().abs()[rows.long()]
    kth = absx.sort(dim=1, descending=True).values[:, k - 1]
    assert torch.equal(thr.cpu(), kth.view(torch.int32))
    assert torch.equal(room.cpu(), k - (absx > kth[:, None]).sum(1).to(torch.int32))
    local = torch.tensor([0, 2, 1, 0, 2, 2])
    sorted_rows, starts, labels = chunk_tokens(rows.long(), local, 2)
    args = (y, sorted_rows.to(DEVICE), starts.to(DEVICE), labels.to(DEVICE), 3, k)
    fresh = topk_stats(*args, positive=False, moments=False)
    again = topk_stats(*args, positive=False, moments=False, thresholds=topk_thresholds(y, sorted_rows.to(DEVICE), k))
    assert torch.equal(fresh["topk"], again["topk"])
    ref = topk_stats_reference(y.cpu(), rows, local, 3, k, torch.zeros(d))
    assert torch.equal(fresh["topk"].cpu().long(), ref["topk"])
