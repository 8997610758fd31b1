"""bench/claims_bench.py's tests and cells, against scipy's t-test and hand-built probe results: the README's
evidence section quotes these p-values and ceilings."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

spec = importlib.util.spec_from_file_location(
    "claims_bench", Path(__file__).resolve().parent.parent / "bench" / "claims_bench.py"
)
claims = sys.modules["claims_bench"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(claims)


def test_paired_test_is_scipys_one_sided_t_test_and_refuses_what_it_cannot_test():
    rng = np.random.default_rng(3)
    for n in (2, 3, 4, 7):
        d = rng.normal(0.5, 1.0, n)
        for h1 in ("less", "greater"):
            got = claims.paired_test(d, h1)
            want = scipy.stats.ttest_1samp(d, 0.0, alternative=h1)
            assert got.df == n - 1 == want.df
            assert (got.t, got.p) == pytest.approx((want.statistic, want.pvalue), rel=1e-9)
    assert claims.paired_test([-1.0], "less") is None  # one split: no s.d.
    assert claims.paired_test([0.5, 0.5, 0.5], "greater") is None  # all equal: t undefined
    assert (
        str(claims.PairedTest(-4.0, 2, 0.0283)) == "p = 0.028" and str(claims.PairedTest(9.0, 2, 4e-4)) == "p < 0.001"
    )


def _run(by_split: dict, probes=("own", "fixed")) -> dict:
    """A Prober-shaped run: {(view, split): {probes: {task: metrics}}} from {split: (accuracy, vowel accuracy)}."""
    return {
        ("v", name): {p: {"gender": {"accuracy": acc}, "phone": {"accuracy_by_type": {"vowel": vowel}}} for p in probes}
        for name, (acc, vowel) in by_split.items()
    }


def test_table_cells_pair_per_split_test_against_the_controls_mean_and_say_ceiling():
    splits = [claims.Split("speaker", s) for s in range(3)]
    t = claims.Table("v", "speaker", splits)
    base = _run({"speaker-0": (1.0, 0.60), "speaker-1": (1.0, 0.50), "speaker-2": (1.0, 0.70)})
    edited = _run({"speaker-0": (1.0, 0.55), "speaker-1": (1.0, 0.47), "speaker-2": (1.0, 0.64)})
    controls = [
        _run({"speaker-0": (1.0, 0.60 + e), "speaker-1": (1.0, 0.50 + e), "speaker-2": (1.0, 0.70 - e)})
        for e in (0.01, -0.02)
    ]
    change = np.array([-5.0, -3.0, -6.0])
    assert t.edited([edited], base, "fixed", "phone", "vowel") == claims.cell(change)
    control_mean = 100 * np.array([(0.01 - 0.02) / 2, (0.01 - 0.02) / 2, (-0.01 + 0.02) / 2])
    want = claims.paired_test(change - control_mean, "less")
    cell = t.versus(edited, controls, base, "fixed", "phone", "vowel", "less")
    assert cell == claims.cell(change - control_mean, want) and want.p < 0.05 and "p = " in cell
    # gender: 1.000 before and after in every split is a ceiling, not a zero change; one split below 1 is not
    assert t.edited([edited], base, "fixed", "gender") == claims.CEILING
    assert t.versus(edited, controls, base, "fixed", "gender", None, "less") == claims.CEILING
    dipped = _run({"speaker-0": (1.0, 0.5), "speaker-1": (0.9, 0.5), "speaker-2": (1.0, 0.5)})
    assert t.edited([dipped], base, "fixed", "gender") == "-3.3 ± 5.8"
