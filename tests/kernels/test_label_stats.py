"""label_stats, both designs, against its float64 torch reference (Triton interpreter on CPU, a GPU when
present).  label_stats has no ``tl.dot``, so bf16 runs in the interpreter too (``NO_DOT``)."""

import pytest
import torch

from neurostat.engine.batching import chunk_tokens
from neurostat.kernels.label_stats import DESIGNS, TUNING, label_stats
from neurostat.kernels.reference import label_stats_reference

NO_DOT = True
"""tests/kernels/conftest.py: these tests run in bf16 in the interpreter as well."""

U = 2.0**-24
"""Unit roundoff of fp32, the precision of the kernels' moment sums."""


def run(y, rows, local, num_labels, k, shift=None, chunk=32, design="split", **which):
    """label_stats on token rows ``rows`` with local labels ``local``, through the engine's chunking."""
    work = (t.to(y.device) for t in chunk_tokens(rows, local, chunk))
    shift = None if shift is None else shift.to(y.device)
    return label_stats(y, *work, num_labels, k, shift, design=design, **which)


def check(got, y, rows, local, num_labels, k, shift) -> None:
    """Counts equal the float64 reference's exactly; moment sums lie within the bound of an fp32 sum.

    Each term is exact input minus an fp32 shift, rounded once (s1), then squared and rounded again (s2),
    and a label's n terms are added in fp32 in some order (a tree of partial sums, atomics between
    programs): |computed − exact| <= γ(n + 2)·Σ|term| with γ(m) = m·u / (1 − m·u), u = 2⁻²⁴, per
    (label, neuron)."""
    ref = label_stats_reference(y.cpu(), rows, local, num_labels, k, shift)
    for name in ("topk", "positive"):
        if name in got:
            assert torch.equal(got[name].cpu().long(), ref[name]), name
    if "s1" not in got:
        return
    dev = y.cpu().index_select(0, rows.long()).double() - shift.double()
    n = torch.bincount(local.long(), minlength=num_labels).double()[:, None]
    gamma = (n + 2) * U / (1 - (n + 2) * U)
    for name, term in (("s1", dev.abs()), ("s2", dev * dev)):
        magnitude = torch.zeros((num_labels, y.shape[1]), dtype=torch.float64).index_add_(0, local.long(), term)
        err = (got[name].cpu().double() - ref[name]).abs()
        assert (err <= gamma * magnitude).all(), f"{name}: {(err - gamma * magnitude).max().item():.3g} over the bound"


TUNINGS = {
    "split-rows1": ("split", {"search_rows": 1, "block_n": 16, "rows": 1}),
    "split-rows2": ("split", {"search_rows": 2, "block_n": 8, "rows": 2}),
    "split-rows4": ("split", {"search_rows": 4, "block_n": 32, "rows": 4}),
    "one-read-bits": ("one-read", {"one_read_rows": 2, "one_read_tiles": 1, "one_read_digit": 1}),
    "one-read-digit3": ("one-read", {"one_read_rows": 2, "one_read_tiles": 3, "one_read_digit": 3}),
    "one-read-digit8": ("one-read", {"one_read_rows": 4, "one_read_tiles": 2, "one_read_digit": 8}),
}
"""Per design, tunings that change which rows and columns share a program (and so the masking at the edges)
and, for ``one-read``, the radix digit (1 bit: the bitwise search; 3 bits: digits that do not divide the
dtype's bits) and which rows share a tile and a program (so where label runs are carried and flushed)."""


def tune(monkeypatch, tuning: str, two_pass: bool = False) -> str:
    """Sets the tuning; returns its design."""
    design, values = TUNINGS[tuning]
    for name, value in {**values, "two_pass": two_pass}.items():
        monkeypatch.setitem(TUNING, name, value)
    return design


@pytest.mark.parametrize(
    "tuning, two_pass",
    [(name, False) for name in TUNINGS] + [("split-rows2", True)],
    ids=lambda v: {True: "two-pass", False: "atomic"}.get(v, v) if isinstance(v, bool) else v,
)
@pytest.mark.parametrize(
    "m, d, k, labels, chunk", [(7, 13, 3, 4, 2), (29, 37, 5, 6, 4), (40, 101, 11, 9, 32), (3, 5, 5, 2, 1)]
)
def test_matches_reference_with_ties_empty_labels_and_ignored_rows(
    device, dtype, two_pass, tuning, m, d, k, labels, chunk, monkeypatch
):
    design = tune(monkeypatch, tuning, two_pass)
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
    got = run(y, rows, local, labels, k, shift, chunk, design)
    assert (got["topk"].cpu().sum(1) == k * torch.bincount(local, minlength=labels)).all()
    check(got, y, rows, local, labels, k, shift)
    assert got["topk"][1].sum() == 0 and got["s1"][1].abs().sum() == 0


@pytest.mark.parametrize("tuning", ["split-rows2", "one-read-bits", "one-read-digit3", "one-read-digit8"])
def test_edge_cases_k_1_and_d_all_equal_rows_one_token_labels(device, dtype, tuning, monkeypatch):
    """k = 1 and k = D; rows whose every |a| is equal (mixed signs, and all zeros); labels of one token
    between long label runs that cross tiles and programs."""
    design = tune(monkeypatch, tuning)
    m, d = 23, 19
    g = torch.Generator().manual_seed(7)
    y = torch.randn(m, d, generator=g) * 3
    y[::3] = torch.round(y[::3])  # ties
    y[2] = 0.75 * torch.sign(torch.randn(d, generator=g))  # every |a| equal
    y[9] = -1.5
    y[15] = 0.0
    y = y.to(dtype).to(device)
    runs = torch.tensor([9, 1, 1, 1, 6, 1, 4])  # label runs once sorted: long, one-token, long, one-token
    local = torch.repeat_interleave(torch.arange(len(runs)), runs)[torch.randperm(m, generator=g)]
    rows = torch.arange(m)
    shift = torch.randn(d, generator=g)
    for k in (1, d):
        got = run(y, rows, local, len(runs), k, shift, 4, design)
        check(got, y, rows, local, len(runs), k, shift)
    assert (got["topk"].cpu() == runs[:, None]).all()  # k = D: every lane of every token


@pytest.mark.parametrize("per_tile, tiles", [(1, 3), (2, 2), (4, 1), (4, 3), (8, 2)])
def test_one_read_runs_carried_across_tiles_and_programs(device, per_tile, tiles, monkeypatch):
    """Label runs of lengths that end inside a tile, at a tile's end, at a program's end and that span
    several programs: each run's sums reach its label once, whatever the blocks."""
    for name, value in {"one_read_rows": per_tile, "one_read_tiles": tiles, "one_read_digit": 8}.items():
        monkeypatch.setitem(TUNING, name, value)
    runs = torch.tensor([1, 2, 3, 4, 5, 7, 8, 9, 16, 1, 1, 13])
    m, d, k = int(runs.sum()), 11, 3
    g = torch.Generator().manual_seed(per_tile * 10 + tiles)
    y = torch.randn(m, d, generator=g).to(device)
    local = torch.repeat_interleave(torch.arange(len(runs)), runs)
    rows = torch.randperm(m, generator=g)  # token rows in any order of the activations
    shift = torch.randn(d, generator=g)
    got = run(y, rows, local, len(runs), k, shift, design="one-read")
    check(got, y, rows, local, len(runs), k, shift)


@pytest.mark.parametrize("tuning", TUNINGS)
def test_ties_at_the_threshold_go_to_the_lower_neuron(device, dtype, tuning, monkeypatch):
    """Rows whose k-th |a| is shared by more lanes than the top k has room for, and rows that share it
    exactly: the chosen lanes are the lower indices, as in the reference."""
    design = tune(monkeypatch, tuning)
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
    got = run(y, rows, local, 5, k, design=design, topk=True, positive=False, moments=False)["topk"].cpu().bool()
    ref = label_stats_reference(y.cpu(), rows, local, 5, k, torch.zeros(d))["topk"].bool()
    assert torch.equal(got, ref)
    assert got[0, :k].all() and torch.equal(torch.nonzero(got[1]).flatten(), torch.tensor([2, 3, 5, 9, 11, 20]))


@pytest.mark.parametrize("tuning", ["split-rows1", "one-read-bits", "one-read-digit3", "one-read-digit8"])
def test_wide_dynamic_range_and_signed_zeros(device, dtype, tuning, monkeypatch):
    """Every exponent the dtype has, subnormals and −0.0 among the lanes: the search over the key's bits
    (bit by bit, or digit by digit) finds the k-th |a| exactly wherever it falls."""
    design = tune(monkeypatch, tuning)
    g = torch.Generator().manual_seed(11)
    info = torch.finfo(dtype)
    m, d, k = 9, 67, 7
    exponents = torch.randint(int(torch.log2(torch.tensor(info.smallest_normal))) - 6, 14, (m, d), generator=g)
    y = torch.sign(torch.randn(m, d, generator=g)) * torch.rand(m, d, generator=g) * 2.0 ** exponents.float()
    y[2, :20] = -0.0
    y[3] = info.tiny * torch.arange(d) / 4  # subnormal and tiny normal magnitudes only
    if dtype == torch.bfloat16 and device == "cpu":  # the interpreter's bf16 -> fp32 cast mangles subnormals
        y[y.abs() < info.smallest_normal] = 0.0
    y = y.to(dtype).to(device)
    rows, local = torch.arange(m), torch.randint(0, 3, (m,), generator=g)
    got = run(y, rows, local, 3, k, design=design, topk=True, positive=True, moments=False)
    check(got, y, rows, local, 3, k, torch.zeros(d))


@pytest.mark.parametrize(
    "design, two_pass", [("split", False), ("split", True), ("one-read", False)], ids=["atomic", "two-pass", "one-read"]
)
def test_subsets_and_no_tokens(device, design, two_pass, monkeypatch):
    tune(monkeypatch, "split-rows1" if design == "split" else "one-read-digit3", two_pass)
    y = torch.randn(6, 9).to(device)
    rows, local = torch.tensor([0, 2, 5]), torch.tensor([1, 0, 1])
    got = run(y, rows, local, 2, 3, design=design, topk=True, positive=False, moments=False)
    assert set(got) == {"topk"} and got["topk"].sum() == 9
    got = run(y, rows, local, 2, 3, torch.zeros(9), design=design, topk=False, positive=True, moments=True)
    ref = label_stats_reference(y.cpu(), rows, local, 2, 3, torch.zeros(9))
    assert set(got) == {"positive", "s1", "s2"} and torch.equal(got["positive"].cpu().long(), ref["positive"])
    none = torch.tensor([], dtype=torch.long)
    got = run(y, none, none, 2, 3, torch.zeros(9), design=design)
    assert set(got) == {"topk", "positive", "s1", "s2"} and all(
        v.shape == (2, 9) and v.sum() == 0 for v in got.values()
    )
    with pytest.raises(ValueError, match="k <= D"):
        run(y, rows, local, 2, 10, design=design, moments=False)
    with pytest.raises(ValueError, match="shift"):
        run(y, rows, local, 2, 3, design=design)


def test_unknown_design_and_tile_rows_are_refused(device, monkeypatch):
    y, rows, local = torch.randn(4, 5).to(device), torch.arange(4), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown label_stats design .chunk.; choose from"):
        run(y, rows, local, 1, 2, design="chunk", moments=False)
    monkeypatch.setitem(TUNING, "one_read_rows", 3)
    with pytest.raises(ValueError, match="power of two"):
        run(y, rows, local, 1, 2, design="one-read", moments=False)
