"""The statistics table is consistent: the engine, the store and the readers can all follow it."""

import numpy as np
import pytest

from neurostat.declarations import COUNT_STATS, DECLARATIONS, DEFAULT_STATS, count_variable, declare, declared
from neurostat.engine.statistics import RULES, TABLE


def test_every_declaration_has_a_torch_function_a_rule_and_names_of_its_own():
    assert set(TABLE) == set(DECLARATIONS) and all(d.rule in RULES for d in DECLARATIONS.values())
    variables = [v for d in DECLARATIONS.values() for v in d.store]
    # every statistic's variables sit in one store; its totals in a namespace of its own
    assert len(set(variables)) == len(variables) and "frames" not in variables, variables
    assert all(len(set(d.state_names)) == len(d.states) and "." not in d.name for d in DECLARATIONS.values())
    for d in DECLARATIONS.values():
        assert all(np.dtype(s.dtype).kind in "if" for s in d.states)


def test_declaring_is_by_keyword_and_checked():
    with pytest.raises(TypeError):
        declare("x", "sum")  # keywords only: entries read like add_state(name, default=..., dist_reduce_fx=...)
    with pytest.raises(ValueError, match="unknown rule"):
        declare("x", rule="mean", states=(), partials=(), store=())
    with pytest.raises(ValueError, match="choose from"):
        declared(["topk", "nope"])


def test_counts_and_defaults_come_from_the_table():
    assert DEFAULT_STATS == ("topk", "positive", "moments") and COUNT_STATS == ("topk", "positive")
    assert count_variable("positive") == "positive_count"
    with pytest.raises(ValueError, match="count statistic 'abs_sum'"):
        count_variable("abs_sum")


def test_kernels_cover_the_declared_states_and_partials():
    """The kernels may not import the table, so their contracts are checked against it here: a statistic
    that claims a kernel has the kernel's partials and, for fold_sums, its totals with the same dtypes."""
    import torch

    from neurostat.kernels.fold_sums import PARTIALS, TOTALS
    from neurostat.kernels.label_stats import label_stats

    folded = [d for d in DECLARATIONS.values() if "fold_sums" in d.kernels]
    assert {s.name: getattr(torch, s.dtype) for d in folded for s in d.states} == TOTALS
    assert {p for d in folded for p in d.partials} == set(PARTIALS)
    covered = [d for d in DECLARATIONS.values() if "label_stats" in d.kernels]
    from neurostat.engine.batching import chunk_tokens

    y, local = torch.randn(5, 7), torch.tensor([0, 1, 0, 1, 1])
    out = label_stats(y, *chunk_tokens(torch.arange(5), local, 4), 2, 2, y.mean(0))
    assert set(out) == {p for d in covered for p in d.partials}
    # each flag of the kernel is named after the statistic it computes
    assert {d.name for d in covered} == {"topk", "positive", "moments"}
