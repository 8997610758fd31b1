"""The engine's side of the statistics table: each declared statistic (:mod:`neurostat.declarations`)
with its torch function — the per-batch partials per label of the batch (sums, maxima or top-N
candidates), the reference path every backend is checked against — and the arithmetic of its rule.
The accumulator, the backends, checkpoints, the store and every merge (shards, resumed runs, ranks)
follow the table: adding a statistic means one declaration, its torch function here and its test
(and, optionally, a kernel).

Words: a rule *folds* one batch's partials into the running totals, and *merges* two sets of totals
(shards, ranks, stores).  Rules (:class:`Rule`, named by the declarations): ``sum`` (partials added),
``chan`` (moments: shifted batch sums → mean and M2, merged in float64 with Chan et al.'s formula),
``max`` and ``top`` (the N largest values per neuron with their packed frame ids, equal values in id
order: not additive, but exact and independent of batching).  A rule reads its state, partial and
variable names from the declaration.  The store records each variable's rule (``statistics.merge``) so that readers
reduce label parts the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..declarations import DECLARATIONS, Declaration, declared
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


def topk_partials(
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


def positive_partials(
    x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    return {"positive": per_label(batch, (x > 0).to(torch.float32))}


def moment_partials(x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ(a − shift) and Σ(a − shift)² per label, in fp32 (fp64 for fp64 activations)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    dev = x.to(dtype) - shift.to(dtype)
    return {"s1": per_label(batch, dev), "s2": per_label(batch, dev.square_())}


def max_abs_partials(
    x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Largest |a| per label (|a| >= 0, so zeros are the neutral start)."""
    absx = x.abs().to(torch.promote_types(x.dtype, torch.float32))
    out = torch.zeros((batch.labels.numel(), x.shape[1]), dtype=absx.dtype, device=x.device)
    return {"max_abs": out.scatter_reduce_(0, batch.local[:, None].expand_as(absx), absx, "amax")}


def abs_sum_partials(
    x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None
) -> dict[str, torch.Tensor]:
    """Σ|a| per label, in float64 (a float32 sum over millions of tokens would lose digits)."""
    return {"abs_sum": per_label(batch, x.abs().to(torch.float64))}


def keep_top(values: torch.Tensor, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column, the ``n`` largest values of [..., M, D] with their ids; equal values in id order (an
    exact, order-independent rule: the result does not depend on how the candidates were batched)."""
    order = torch.sort(ids, dim=-2, stable=True).indices
    values, ids = values.gather(-2, order), ids.gather(-2, order)
    order = torch.sort(values, dim=-2, descending=True, stable=True).indices[..., :n, :]
    return values.gather(-2, order), ids.gather(-2, order)


def top_frames_partials(x: torch.Tensor, batch: TokenBatch, params: Params, shift: torch.Tensor | None) -> dict:
    """The batch's N largest activations per neuron [N, D] (float64) with their frame ids; empty slots
    hold −inf and id −1 when the batch has fewer than N tokens.  No host sync."""
    n, width = params.top_frames, x.shape[1]
    values = torch.full((n, width), -torch.inf, dtype=torch.float64, device=x.device)
    ids = torch.full((n, width), -1, dtype=torch.int64, device=x.device)
    order = torch.argsort(batch.frame_ids, stable=True)  # every column shares the rows' ids: sort them once
    top = torch.sort(x.index_select(0, order).to(torch.float64), dim=0, descending=True, stable=True)
    kept = top.indices[:n]
    values[: kept.shape[0]], ids[: kept.shape[0]] = top.values[:n], batch.frame_ids[order][kept]
    return {"top_value": values, "top_id": ids}


class Rule:
    """How a statistic's totals fold in a batch, merge with other totals and become store variables."""

    name: str

    def fold(self, stat, totals, partials, labels, counts, tokens, shift) -> None:
        """Folds one batch's partials ([U, D]; [N, D] for ``top``) into one layer's totals [num_labels, D] at rows ``labels``
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

    def fold(self, stat, totals, partials, labels, counts, tokens, shift) -> None:
        for name in stat.states:
            totals[name].index_add_(0, labels, partials[name].to(totals[name].dtype))

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        for name in stat.states:
            mine[name] += theirs[name]

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        for name in stat.states:
            reduce(totals[name], "sum")


class ChanRule(Rule):
    """Totals mean and M2 (the statistic's two states); batch sums Σ(a − c), Σ(a − c)² around a per-neuron
    shift c; store variables mean and population variance."""

    name = "chan"

    def fold(self, stat, totals, partials, labels, counts, tokens, shift) -> None:
        (mean_name, m2_name), (s1, s2) = stat.states, stat.partials
        mean_t, m2_t = totals[mean_name], totals[m2_name]
        n_b = counts.to(torch.float64)[:, None]
        n_a = tokens.index_select(0, labels).to(torch.float64)[:, None]
        mean_b, m2_b = from_shifted_sums(n_b, partials[s1].double(), partials[s2].double(), shift.double())
        mean, m2 = chan_merge(n_a, mean_t.index_select(0, labels), m2_t.index_select(0, labels), n_b, mean_b, m2_b)
        mean_t.index_copy_(0, labels, mean)
        m2_t.index_copy_(0, labels, m2)

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        mean, m2 = stat.states
        mine[mean], mine[m2] = chan_merge(n_a, mine[mean], mine[m2], n_b, theirs[mean], theirs[m2])

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        """Every rank's sets pooled at once: the mean from Σ n·mean, then Σ M2 + n·(mean − pooled)²."""
        mean_name, m2_name = stat.states
        mean = totals[mean_name] * n
        reduce(mean, "sum")
        mean /= total_n + (total_n == 0)
        m2 = totals[m2_name] + n * (totals[mean_name] - mean) ** 2
        reduce(m2, "sum")
        totals[mean_name], totals[m2_name] = mean, m2

    def to_store(self, stat, totals, n) -> dict[str, np.ndarray]:
        (mean, m2), (mean_var, var_var) = stat.states, stat.store
        with np.errstate(invalid="ignore", divide="ignore"):
            return {mean_var: totals[mean], var_var: np.maximum(totals[m2], 0) / n}

    def from_store(self, stat, variables, n) -> dict[str, np.ndarray]:
        (mean, m2), (mean_var, var_var) = stat.states, stat.store
        return {mean: np.nan_to_num(variables[mean_var]), m2: np.nan_to_num(variables[var_var]) * n}


class MaxRule(Rule):
    name = "max"

    def fold(self, stat, totals, partials, labels, counts, tokens, shift) -> None:
        for name in stat.states:  # each label occurs once in a batch
            total = totals[name]
            total.index_copy_(0, labels, torch.maximum(total.index_select(0, labels), partials[name].to(total.dtype)))

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        for name in stat.states:
            torch.maximum(mine[name], theirs[name], out=mine[name])

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        for name in stat.states:
            reduce(totals[name], "max")


class TopRule(Rule):
    """Totals [layer, N, neuron]: the N largest values seen and their packed frame ids (the statistic's
    two states; :func:`frame_id_parts` unpacks them), kept by :func:`keep_top` — exact across batches,
    shards, ranks and resumed runs; store variables: the values, the utterance indices and the frames."""

    name = "top"

    def fold(self, stat, totals, partials, labels, counts, tokens, shift) -> None:
        (value, frame_id), (part_value, part_id) = stat.states, stat.partials
        values = torch.cat([totals[value], partials[part_value].to(totals[value].dtype)])
        ids = torch.cat([totals[frame_id], partials[part_id]])
        totals[value][:], totals[frame_id][:] = keep_top(values, ids, totals[value].shape[0])

    def combine(self, stat, mine, theirs, n_a, n_b) -> None:
        value, frame_id = stat.states
        values = torch.cat([mine[value], theirs[value]], dim=-2)
        ids = torch.cat([mine[frame_id], theirs[frame_id]], dim=-2)
        mine[value], mine[frame_id] = keep_top(values, ids, mine[value].shape[-2])

    def all_reduce(self, stat, totals, n, total_n, reduce) -> None:
        value, frame_id = stat.states
        values, ids = reduce(totals[value], "gather"), reduce(totals[frame_id], "gather")
        rows = totals[value].shape[-2]
        totals[value], totals[frame_id] = keep_top(torch.cat(values, -2), torch.cat(ids, -2), rows)

    def to_store(self, stat, totals, n) -> dict[str, np.ndarray]:
        (value, frame_id), (value_var, utterance_var, frame_var) = stat.states, stat.store
        utterance, frames = frame_id_parts(totals[frame_id])
        return {
            value_var: np.where(totals[frame_id] < 0, np.nan, totals[value]),
            utterance_var: utterance,
            frame_var: frames,
        }

    def from_store(self, stat, variables, n) -> dict[str, np.ndarray]:
        (value, frame_id), (value_var, utterance_var, frame_var) = stat.states, stat.store
        utterance, frames = variables[utterance_var], variables[frame_var]
        empty = utterance < 0
        ids = np.where(empty, -1, (utterance.astype(np.int64) << FRAME_BITS) | frames)
        return {value: np.where(empty, -np.inf, variables[value_var]), frame_id: ids}


RULES = {rule.name: rule for rule in (SumRule(), ChanRule(), MaxRule(), TopRule())}


@dataclass(frozen=True)
class Statistic:
    """A declared statistic (:mod:`neurostat.declarations`) with its torch function and merge rule."""

    declaration: Declaration
    torch_partials: Callable[[torch.Tensor, TokenBatch, Params, torch.Tensor | None], dict[str, torch.Tensor]]

    def __getattr__(self, name: str):  # name, partials, store, fill, axis, needs_shift, kernels, dims
        if name.startswith("__") or name == "declaration":
            raise AttributeError(name)
        return getattr(self.declaration, name)

    @property
    def states(self) -> tuple[str, ...]:
        """The totals' names (checkpoint keys)."""
        return self.declaration.state_names

    @property
    def rule(self) -> Rule:
        """The arithmetic of the declared rule (the declaration holds its name)."""
        return RULES[self.declaration.rule]

    def initial(self, shape: tuple[int, ...], device, params: Params | None = None) -> dict[str, torch.Tensor]:
        """Fresh totals for ``shape`` = (layers, labels, neurons)."""
        layers, labels, width = shape
        rows = (params or Params(1)).top_frames if self.axis == "top" else labels
        return {
            s.name: torch.full((layers, rows, width), s.start, dtype=getattr(torch, s.dtype), device=device)
            for s in self.declaration.states
        }


_TORCH_PARTIALS = {
    "topk": topk_partials,
    "positive": positive_partials,
    "moments": moment_partials,
    "max_abs": max_abs_partials,
    "abs_sum": abs_sum_partials,
    "top_frames": top_frames_partials,
}
TABLE: dict[str, Statistic] = {name: Statistic(d, _TORCH_PARTIALS[name]) for name, d in DECLARATIONS.items()}
"""Every declared statistic with its torch function (the reference path every backend is checked against)."""


def statistics(names) -> tuple[Statistic, ...]:
    """The table's entries for ``names`` in table order; an unknown name is an error listing the known."""
    return tuple(TABLE[d.name] for d in declared(names))
