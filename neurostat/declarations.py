"""Every statistic neurostat collects, declared once and without torch, so that the engine, the store's
readers and the command line follow one table.

A declaration names the statistic (what ``--stat`` takes), its merge rule, its totals (the state a
checkpoint keeps: one [layer, row, neuron] array each, with dtype and initial value), the per-batch
partials a backend returns for it (sums, maxima or top-N candidates), its store variables with their fill for labels without tokens, and
which kernels compute it.  Its torch function and the rule's arithmetic live in
:mod:`neurostat.engine.statistics`.

Rules: ``sum`` (batch sums added to the totals), ``chan`` (shifted batch sums → mean and M2, merged
with Chan et al.'s formula; states: mean, M2; partials: Σ(a − c), Σ(a − c)²; variables: mean, var),
``max`` (maxima) and ``top`` (the N largest values per neuron with their packed frame ids; states:
values, ids; variables: values, utterances, frames).
"""

from __future__ import annotations

from dataclasses import dataclass

RULES = ("sum", "chan", "max", "top")
STORE_NAMES = ("layer", "label", "neuron", "top", "utterance", "ffn", "original_neuron")
"""The store's dimensions and coordinates besides the label parts' (which no label part may take)."""
KERNELS = ("label_stats", "fold_sums", "ffn_up_stats")


@dataclass(frozen=True)
class State:
    """One array of a statistic's totals: its checkpoint key, numpy dtype name and initial value."""

    name: str
    dtype: str
    start: float = 0


@dataclass(frozen=True)
class Declaration:
    name: str
    rule: str
    states: tuple[State, ...]
    partials: tuple[str, ...]
    store: tuple[str, ...]
    fill: float
    default: bool
    axis: str
    needs_shift: bool
    kernels: tuple[str, ...]

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    def dims(self) -> tuple[str, str, str]:
        """The store dimensions of its variables."""
        return ("layer", self.axis, "neuron")


def declare(
    name: str,
    *,
    rule: str,
    states: tuple[State, ...],
    partials: tuple[str, ...],
    store: tuple[str, ...],
    fill: float = 0,
    default: bool = False,
    axis: str = "label",
    needs_shift: bool = False,
    kernels: tuple[str, ...] = (),
) -> Declaration:
    """A statistic: ``rule`` of :data:`RULES`, ``states`` its totals, ``partials`` what a backend returns
    per batch label, ``store`` its variables (``fill`` where a label has no tokens), ``default``: collected
    unless ``--stat`` says otherwise, ``axis``: the totals' middle axis (``label``, or ``top`` for the N
    largest), ``needs_shift``: its partials are taken around a per-neuron shift, ``kernels``: of :data:`KERNELS`."""
    if rule not in RULES or not set(kernels) <= set(KERNELS):
        raise ValueError(f"{name}: unknown rule {rule!r} or kernels {kernels}")
    return Declaration(name, rule, states, partials, store, fill, default, axis, needs_shift, kernels)


NAN = float("nan")
DECLARATIONS: dict[str, Declaration] = {
    d.name: d
    for d in (
        declare(
            "topk",  # tokens at which |a_j| is among the top k of its layer (ties to the lower index)
            rule="sum",
            states=(State("topk", "int64"),),
            partials=("topk",),
            store=("topk_count",),
            default=True,
            kernels=("label_stats", "fold_sums"),
        ),
        declare(
            "positive",  # tokens with a_j > 0
            rule="sum",
            states=(State("positive", "int64"),),
            partials=("positive",),
            store=("positive_count",),
            default=True,
            kernels=("label_stats", "fold_sums", "ffn_up_stats"),
        ),
        declare(
            "moments",  # mean and population variance of a_j
            rule="chan",
            states=(State("mean", "float64"), State("m2", "float64")),
            partials=("s1", "s2"),
            store=("mean", "var"),
            fill=NAN,
            default=True,
            needs_shift=True,
            kernels=("label_stats", "fold_sums", "ffn_up_stats"),
        ),
        declare(
            "max_abs",  # largest |a_j|
            rule="max",
            states=(State("max_abs", "float64"),),
            partials=("max_abs",),
            store=("max_abs",),
            fill=NAN,
        ),
        declare(
            "abs_sum",  # Σ|a_j| (the L1 mass; divided by frames: the mean |a_j|)
            rule="sum",
            states=(State("abs_sum", "float64"),),
            partials=("abs_sum",),
            store=("abs_sum",),
        ),
        declare(
            "top_frames",  # the N largest a_j over the corpus, with their utterance and frame
            rule="top",
            states=(State("top_value", "float64", float("-inf")), State("top_id", "int64", -1)),
            partials=("top_value", "top_id"),
            store=("top_value", "top_utterance", "top_frame"),
            fill=NAN,
            axis="top",
        ),
    )
}
DEFAULT_STATS = tuple(name for name, d in DECLARATIONS.items() if d.default)
COUNT_STATS = tuple(name for name, d in DECLARATIONS.items() if d.rule == "sum" and d.states[0].dtype == "int64")
"""The statistics that count tokens (a probability P(j | label) is their count over the tokens)."""


def declared(names) -> tuple[Declaration, ...]:
    """The declarations of ``names`` in table order; an unknown name is an error listing the known."""
    unknown = sorted(set(names) - set(DECLARATIONS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {tuple(DECLARATIONS)}")
    return tuple(d for name, d in DECLARATIONS.items() if name in names)


def store_dims(names) -> dict[str, tuple[str, ...]]:
    """The store dimensions of every variable of these statistics (and of ``frames``)."""
    return {"frames": ("label",), **{var: d.dims() for d in declared(names) for var in d.store}}


def statistic_of(variable: str) -> str | None:
    """The statistic (what ``--stat`` takes) whose store holds ``variable``; None for ``frames``."""
    return next((name for name, d in DECLARATIONS.items() if variable in d.store), None)


def count_variable(name: str) -> str:
    """The store variable of a count statistic (a ``sum`` of int64 totals), for ``Stats.counts``."""
    if name not in COUNT_STATS:
        raise ValueError(f"unknown count statistic {name!r}; choose from {COUNT_STATS}")
    return DECLARATIONS[name].store[0]
