"""The statistics table: every statistic the engine collects, declared once.

A :class:`Statistic` names its totals (one [layer, label, neuron] array each, with dtype and initial
value), the per-batch sums a backend returns for it (per label of the batch, [U, D]), the torch
function that computes those sums (the reference path every backend is checked against), its merge
rule and its store variables with their fill for labels without tokens.  The accumulator, the
backends, checkpoints, the store and every merge (batches, shards, resumed runs) follow the table:
adding a statistic means one entry here, its torch function and its test (and, optionally, a kernel).

Merge rules (:class:`Rule`): ``sum`` (counts: batch counts added to int64 totals), ``chan`` (moments:
shifted batch sums → mean and M2, merged in float64 with Chan et al.'s formula), ``max`` and ``top``
(the N largest values per neuron with their frame ids, equal values in id order: not additive, but
exact and independent of batching).
The store records each variable's rule (array attribute ``merge``) so that readers reduce label
parts the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..moments import chan_merge, from_shifted_sums
from .batching import FRAME_BITS, TokenBatch


@dataclass(frozen=True)
class Params:
    """What the statistics' functions take besides the activations: k of the top-k statistic, N of the
    top frames."""

    k: int
    top_frames: int = 16


def frame_id_parts(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(utterance index, frame) of frame ids; −1 for both where the id is −1 (an empty slot)."""
    empty = ids < 0
    return np.where(empty, -1, ids >> FRAME_BITS), np.where(empty, -1, ids & ((1 << FRAME_BITS) - 1))


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean [N, D]: |x_j| among the k largest of its row; ties at the k-th value go to lower j."""
    absx = x.abs()
    kth = absx.topk(k, dim=1, sorted=False).values.amin(1, keepdim=True)
    mask = absx >= kth
    excess = mask.sum(1) - k
    if absx.device.type == "cpu":
        rows = torch.nonzero(excess > 0).flatten()
        if rows.numel():
            mask[rows] = _break_ties(absx[rows], kth[rows], k)
    else:
        mask = torch.where((excess > 0)[:, None], _break_ties(absx, kth, k), mask)
    return mask


def _break_ties(absx: torch.Tensor, kth: torch.Tensor, k: int) -> torch.Tensor:
    above = absx > kth
    at = absx == kth
    room = k - above.sum(1, keepdim=True)
    return above | (at & (at.cumsum(1) <= room))


def per_label(batch: TokenBatch, values: torch.Tensor) -> torch.Tensor:
    """Sums of the token rows ``values`` [N, D] per label of the batch → [U, D]."""
    out = torch.zeros((batch.labels.numel(), values.shape[1]), dtype=values.dtype, device=values.device)
    return out.index_add_(0, batch.local, values)


def topk_sums(
    x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Top-k counts per batch label [U, D].

    On CPU the k+1 largest values show which rows have a tie at the k-th value: only those rows need the
    exact mask; the others are counted from the top-k indices.  On GPU the exact mask is computed for
    every row, so nothing waits on the host.
    """
    width, k = x.shape[1], params.k
    if x.device.type != "cpu" or k == width:
        return {"topk": per_label(batch, topk_mask(x, k).to(torch.float32))}
    values, idx = x.abs().topk(k + 1, dim=1)
    tied = values[:, k - 1] == values[:, k]
    flat = (batch.local[:, None] * width + idx[:, :k])[~tied].flatten()
    counts = torch.bincount(flat, minlength=batch.labels.numel() * width).view(-1, width)
    rows = torch.nonzero(tied).flatten()
    if rows.numel():
        counts.index_add_(0, batch.local[rows], topk_mask(x[rows], k).to(torch.int64))
    return {"topk": counts}


def positive_sums(
    x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    return {"positive": per_label(batch, (x > 0).to(torch.float32))}


def moment_sums(x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ(a − shift) and Σ(a − shift)² per label, in fp32 (fp64 for fp64 activations)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    dev = x.to(dtype) - shift.to(dtype)
    return {"s1": per_label(batch, dev), "s2": per_label(batch, dev.square_())}


def max_abs_sums(
    x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Largest |a| per label (|a| >= 0, so zeros are the neutral start)."""
    absx = x.abs().to(torch.promote_types(x.dtype, torch.float32))
    out = torch.zeros((batch.labels.numel(), x.shape[1]), dtype=absx.dtype, device=x.device)
    return {"max_abs": out.scatter_reduce_(0, batch.local[:, None].expand_as(absx), absx, "amax")}


def keep_top(values: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the ``n`` largest values of [..., M, D] with their ids; equal values in id order (an
    exact, order-independent rule: the result does not depend on how the candidates were batched)."""
    order = torch.sort(ids, dim=-2, stable=True).indices
    values, ids = values.gather(-2, order), ids.gather(-2, order)
    order = torch.sort(values, dim=-2, descending=True, stable=True).indices[..., :n, :]
    return values.gather(-2, order), ids.gather(-2, order)


def top_frames_sums(x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None) -> dict:
    """The batch's N largest activations per neuron [N, D] (float64) with their frame ids; empty slots
    hold −inf and id −1 when the batch has fewer than N tokens.  No host sync."""
    n, width = params.top_frames, x.shape[1]
    values = torch.full((n, width), -torch.inf, dtype=torch.float64, device=x.device)
    ids = torch.full((n, width), -1, dtype=torch.int64, device=x.device)
    order = torch.argsort(batch.frame_ids, stable=True)  # every column shares the rows' ids: sort them once
    top = torch.sort(x.index_select(0, order).to(torch.float64), dim=0, descending=True, stable=True)
    kept = top.indices[:n]
    values[: kept.shape[0]], ids[: kept.shape[0]] = top.values[:n], batch.frame_ids[order][kept]
    return {"top_value": values, "top_frame": ids}


class Rule:
    """How a statistic's totals take in a batch, merge with other totals and become store variables."""

    name: str

    def add_batch(self, stat, totals, sums, labels, counts, tokens, shift) -> None:
        """Merges one batch's sums [U, D] into one layer's totals [num_labels, D] at rows ``labels``
        (``counts``: the batch's tokens per label, ``tokens``: tokens per label before the batch)."""
        raise NotImplementedError

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        """Merges the totals ``theirs`` into ``mine`` (dicts of [layer, label, neuron] tensors; ``n_a``,
        ``n_b``: tokens per label, broadcastable), in place."""
        raise NotImplementedError

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        """Combines the totals of every rank of a distributed run, in place (``reduce(tensor, op)``: an
        all-reduce with op ``sum`` or ``max``, or with ``gather`` the list of every rank's tensor; ``n``:
        this rank's tokens per label, ``total_n``: all ranks', float64 and broadcastable)."""
        raise NotImplementedError

    def to_store(self, stat, totals, n) -> dict[str, np.ndarray]:
        """Store variables from the totals (numpy; ``n`` tokens per label broadcastable, float64)."""
        return {var: totals[state] for var, state in zip(stat.store, stat.states)}

    def from_store(self, stat, variables, n) -> dict[str, np.ndarray]:
        """Totals back from store variables (what merging stores starts from)."""
        return {state: np.nan_to_num(variables[var]) for var, state in zip(stat.store, stat.states)}


class SumRule(Rule):
    name = "sum"

    def add_batch(self, stat, totals, sums, labels, counts, tokens, shift) -> None:
        for name in stat.states:
            totals[name].index_add_(0, labels, sums[name].to(totals[name].dtype))

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        for name in stat.states:
            mine[name] += theirs[name]

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        for name in stat.states:
            reduce(totals[name], "sum")


class ChanRule(Rule):
    """Totals ``mean`` and ``m2``; batch sums ``s1``, ``s2`` around a per-neuron shift."""

    name = "chan"

    def add_batch(self, stat, totals, sums, labels, counts, tokens, shift) -> None:
        mean_t, m2_t = totals["mean"], totals["m2"]
        n_b = counts.to(torch.float64)[:, None]
        n_a = tokens.index_select(0, labels).to(torch.float64)[:, None]
        mean_b, m2_b = from_shifted_sums(n_b, sums["s1"].double(), sums["s2"].double(), shift.double())
        mean, m2 = chan_merge(n_a, mean_t.index_select(0, labels), m2_t.index_select(0, labels), n_b, mean_b, m2_b)
        mean_t.index_copy_(0, labels, mean)
        m2_t.index_copy_(0, labels, m2)

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        mine["mean"], mine["m2"] = chan_merge(n_a, mine["mean"], mine["m2"], n_b, theirs["mean"], theirs["m2"])

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        """Every rank's sets pooled at once: the mean from Σ n·mean, then Σ M2 + n·(mean − pooled)²."""
        mean = totals["mean"] * n
        reduce(mean, "sum")
        mean /= total_n + (total_n == 0)
        m2 = totals["m2"] + n * (totals["mean"] - mean) ** 2
        reduce(m2, "sum")
        totals["mean"], totals["m2"] = mean, m2

    def to_store(self, stat, totals, n) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"mean": totals["mean"], "var": np.maximum(totals["m2"], 0) / n}

    def from_store(self, stat, variables, n) -> dict[str, np.ndarray]:
        return {"mean": np.nan_to_num(variables["mean"]), "m2": np.nan_to_num(variables["var"]) * n}


class MaxRule(Rule):
    name = "max"

    def add_batch(self, stat, totals, sums, labels, counts, tokens, shift) -> None:
        for name in stat.states:  # each label occurs once in a batch
            total = totals[name]
            total.index_copy_(0, labels, torch.maximum(total.index_select(0, labels), sums[name].to(total.dtype)))

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        for name in stat.states:
            torch.maximum(mine[name], theirs[name], out=mine[name])

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        for name in stat.states:
            reduce(totals[name], "max")


class TopRule(Rule):
    """Totals ``top_value`` and ``top_frame`` [layer, N, neuron]: the N largest values seen and their frame
    ids, kept by :func:`keep_top` — exact across batches, shards, ranks and resumed runs."""

    name = "top"

    def add_batch(self, stat, totals, sums, labels, counts, tokens, shift) -> None:
        values = torch.cat([totals["top_value"], sums["top_value"].to(totals["top_value"].dtype)])
        ids = torch.cat([totals["top_frame"], sums["top_frame"]])
        totals["top_value"][:], totals["top_frame"][:] = keep_top(values, ids, totals["top_value"].shape[0])

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        values = torch.cat([mine["top_value"], theirs["top_value"]], dim=-2)
        ids = torch.cat([mine["top_frame"], theirs["top_frame"]], dim=-2)
        mine["top_value"], mine["top_frame"] = keep_top(values, ids, mine["top_value"].shape[-2])

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        values, ids = reduce(totals["top_value"], "gather"), reduce(totals["top_frame"], "gather")
        rows = totals["top_value"].shape[-2]
        totals["top_value"], totals["top_frame"] = keep_top(torch.cat(values, -2), torch.cat(ids, -2), rows)

    def to_store(self, stat, totals, n) -> dict[str, np.ndarray]:
        utterance, frame = frame_id_parts(totals["top_frame"])
        value = np.where(totals["top_frame"] < 0, np.nan, totals["top_value"])
        return {"top_value": value, "top_utterance": utterance, "top_frame": frame}

    def from_store(self, stat, variables, n) -> dict[str, np.ndarray]:
        utterance, frame = variables["top_utterance"], variables["top_frame"]
        empty = utterance < 0
        ids = np.where(empty, -1, (utterance.astype(np.int64) << FRAME_BITS) | frame)
        return {"top_value": np.where(empty, -np.inf, variables["top_value"]), "top_frame": ids}


RULES = {rule.name: rule for rule in (SumRule(), ChanRule(), MaxRule(), TopRule())}


@dataclass(frozen=True)
class Statistic:
    """One statistic: its totals, per-batch sums, torch function, merge rule and store variables."""

    name: str  # what --stat takes
    states: tuple[str, ...]  # totals, one [layer, label, neuron] array each (checkpoint keys)
    dtype: torch.dtype  # of the totals
    sums: tuple[str, ...]  # per-batch sums [U, D] a backend returns
    torch_sums: Callable[[torch.Tensor, TokenBatch, Params, torch.Tensor | None], dict[str, torch.Tensor]]
    rule: str  # key of RULES
    store: tuple[str, ...]  # store variables (layer, label, neuron)
    fill: float  # store value for labels without tokens
    needs_shift: bool = False  # the per-neuron shift of the moment sums
    default: bool = True  # collected unless --stat says otherwise
    about: str = ""
    axis: str = "label"  # the totals' middle axis: one row per label, or ("top") the N largest
    start: tuple[float, ...] = ()  # initial value of each state [default 0]
    state_dtypes: tuple[torch.dtype, ...] = ()  # dtype of each state [default dtype]

    @property
    def merge(self) -> Rule:
        return RULES[self.rule]

    def initial(self, shape: tuple[int, ...], device, params: Params | None = None) -> dict[str, torch.Tensor]:
        """Fresh totals for ``shape`` = (layers, labels, neurons)."""
        layers, labels, width = shape
        rows = (params or Params(1)).top_frames if self.axis == "top" else labels
        starts = self.start or (0,) * len(self.states)
        dtypes = self.state_dtypes or (self.dtype,) * len(self.states)
        return {
            name: torch.full((layers, rows, width), start, dtype=dtype, device=device)
            for name, start, dtype in zip(self.states, starts, dtypes)
        }

    def dims(self, var: str) -> tuple[str, str, str]:
        """The store dimensions of one of its variables."""
        return ("layer", self.axis, "neuron")


TABLE: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic(
            "topk",
            ("topk",),
            torch.int64,
            ("topk",),
            topk_sums,
            "sum",
            ("topk_count",),
            0,
            about="tokens at which |a_j| is among the top k of its layer (ties to the lower index)",
        ),
        Statistic(
            "positive",
            ("positive",),
            torch.int64,
            ("positive",),
            positive_sums,
            "sum",
            ("positive_count",),
            0,
            about="tokens with a_j > 0",
        ),
        Statistic(
            "moments",
            ("mean", "m2"),
            torch.float64,
            ("s1", "s2"),
            moment_sums,
            "chan",
            ("mean", "var"),
            np.nan,
            needs_shift=True,
            about="mean and population variance of a_j",
        ),
        Statistic(
            "max_abs",
            ("max_abs",),
            torch.float64,
            ("max_abs",),
            max_abs_sums,
            "max",
            ("max_abs",),
            np.nan,
            default=False,
            about="largest |a_j|",
        ),
        Statistic(
            "top_frames",
            ("top_value", "top_frame"),
            torch.float64,
            ("top_value", "top_frame"),
            top_frames_sums,
            "top",
            ("top_value", "top_utterance", "top_frame"),
            np.nan,
            default=False,
            about="the N largest a_j over the corpus, with their utterance and frame",
            axis="top",
            start=(-np.inf, -1),
            state_dtypes=(torch.float64, torch.int64),
        ),
    )
}
DEFAULT_STATS = tuple(name for name, s in TABLE.items() if s.default)


def store_dims(names) -> dict[str, tuple[str, ...]]:
    """The store dimensions of every variable of these statistics (and of ``frames``)."""
    return {"frames": ("label",), **{var: s.dims(var) for s in statistics(names) for var in s.store}}


def statistics(names) -> tuple[Statistic, ...]:
    """The table's entries for ``names`` in table order; an unknown name is an error listing the known."""
    unknown = sorted(set(names) - set(TABLE))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {tuple(TABLE)}")
    return tuple(s for name, s in TABLE.items() if name in names)
