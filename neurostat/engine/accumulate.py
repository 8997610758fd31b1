"""The accumulator: additive per-(layer, label, neuron) totals of the statistics in the table.

One call per layer and batch (:meth:`Accumulator.update`, or :meth:`Accumulator.ffn_activation` inside
the FFN's forward) adds that layer's token rows: the backend computes the per-label batch partials, each
statistic's rule folds them in, and the layer's token counts grow — so nothing depends on the
order of calls.  Moment sums are taken around a per-neuron shift (the layer's mean over its first
batch) and folded into float64 totals with Chan et al.'s formula; counts are exact int64.
All of it merges exactly across shards, ranks and resumed runs (:meth:`Accumulator.merge`).  On CUDA
the statistics are queued on a side stream by default (:mod:`neurostat.engine.overlap`); every reader
of the totals joins it first.
"""

from __future__ import annotations

import numpy as np
import torch

from ..declarations import DEFAULT_STATS
from .backends import Backend, make_backend
from .batching import TokenBatch
from .overlap import StatsStream
from .statistics import TABLE, Params, statistics


class Accumulator:
    """Totals for ``num_layers`` layers × ``num_labels`` labels × ``width`` neurons (× the N kept values
    instead of the labels for a ``top`` statistic)."""

    def __init__(
        self,
        num_layers: int,
        num_labels: int,
        width: int,
        k: int,
        stats: tuple[str, ...] = DEFAULT_STATS,
        device: torch.device | str = "cpu",
        backend: str | Backend = "torch",
        activation: str = "gelu",
        precision: str = "fp32",
        top_frames: int = 16,
        overlap: bool | None = None,
        design: str | None = None,
    ):
        """``backend``: a name of :data:`~neurostat.engine.backends.BACKENDS` (built here for these
        statistics, ``activation``, ``precision`` and the ``label_stats`` ``design`` of a Triton backend,
        None: the kernels' default) or a backend built for them already; ``overlap``: the statistics on a
        side CUDA stream (default: on CUDA; :mod:`~neurostat.engine.overlap`)."""
        if not 1 <= k <= width:
            raise ValueError(f"top-k needs 1 <= k <= width, got k={k}, width={width}")
        self.table = statistics(stats)
        self.stats = tuple(s.name for s in self.table)
        self.shape = (num_layers, num_labels, width)
        self.device = torch.device(device)
        self.params = Params(k, top_frames)
        if isinstance(backend, Backend):
            if backend.stats != self.table or backend.params != self.params:
                raise ValueError(f"the {backend.name} backend was built for other statistics or parameters")
            self.backend = backend
        else:
            self.backend = make_backend(backend, self.table, self.params, activation, precision, design)
        self.totals: dict[str, dict[str, torch.Tensor]] = {
            s.name: s.initial(self.shape, self.device, self.params) for s in self.table
        }
        """Each statistic's own totals, by its state names."""
        self.tokens = torch.zeros((num_layers, num_labels), dtype=torch.int64, device=self.device)
        self.needs_shift = any(s.needs_shift for s in self.table)
        self.shift: list[torch.Tensor | None] = [None] * num_layers
        self.side = StatsStream(self.device, overlap)

    def _layer_totals(self, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        return {name: {state: t[layer] for state, t in own.items()} for name, own in self.totals.items()}

    def _add(self, layer: int, batch: TokenBatch, partials: dict[str, torch.Tensor]) -> None:
        self.backend.fold(partials, batch, self.tokens[layer], self.shift[layer], self._layer_totals(layer))
        self.tokens[layer].index_add_(0, batch.labels, batch.counts)

    def update(self, layer: int, a: torch.Tensor, batch: TokenBatch) -> None:
        """Adds the token rows ``a[batch.index]`` of one layer's activations ``a`` [B*T, D]."""
        with self.side.run(a, *batch.tensors()):
            self._add_rows(layer, a, batch)

    def _add_rows(self, layer: int, rows: torch.Tensor, batch: TokenBatch) -> None:
        """The statistics of the rows ``rows[batch.index]`` (the layer's first batch sets the moment shift:
        the mean of its token rows)."""
        if self.needs_shift and self.shift[layer] is None:
            self._set_shift(layer, rows.index_select(0, batch.index))
        self._add(layer, batch, self.backend.partials(rows, batch, self.shift[layer]))

    def _set_shift(self, layer: int, rows: torch.Tensor) -> None:
        self.shift[layer] = rows.mean(0, dtype=torch.promote_types(rows.dtype, torch.float32))

    def ffn_activation(self, layer: int, ffn, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``act(W1 x + b1)`` of one FFN as the model continues from it, with its statistics added (queued
        on the side stream, except the fused backend's, which its GEMM computes)."""
        if self.backend.fused:
            return self._fused_activation(layer, ffn, hidden, batch)
        a, pre = self.backend.ffn_forward(ffn, hidden)
        with self.side.run(a, pre, *batch.tensors()):
            rows, rows_batch = self.backend.stats_rows(ffn, a, pre, batch)
            self._add_rows(layer, rows, rows_batch)
        return a

    def _fused_activation(self, layer: int, ffn, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        if self.needs_shift and self.shift[layer] is None:
            self._set_shift(layer, self.backend.token_activations(ffn, hidden, batch))
        a, partials = self.backend.ffn_partials(ffn, hidden, batch, self.shift[layer])
        with self.side.run(*partials.values(), *batch.tensors()):
            self._add(layer, batch, partials)
        return a

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Adds ``other``'s totals into this one, each statistic by its merge rule."""
        self.side.join()
        other.side.join()
        if other.shape != self.shape or other.params != self.params or other.stats != self.stats:
            raise ValueError(
                f"cannot merge accumulators of shape/parameters/stats {other.shape}/{other.params}/{other.stats} "
                f"into {self.shape}/{self.params}/{self.stats}"
            )
        theirs = {name: {state: t.to(self.device) for state, t in own.items()} for name, own in other.totals.items()}
        other_tokens = other.tokens.to(self.device)
        n_a, n_b = self.tokens.double()[..., None], other_tokens.double()[..., None]
        for s in self.table:
            s.rule.combine(s, self.totals[s.name], theirs[s.name], n_a, n_b)
        self.tokens += other_tokens
        return self

    def all_reduce(self, reduce) -> None:
        """Combines this accumulator with every other rank's, in place, each statistic by its rule
        (``reduce(tensor, op)``: an all-reduce with op ``sum`` or ``max``, or with ``gather`` the list of
        every rank's tensor)."""
        self.side.join()
        n = self.tokens.double()[..., None]
        total = self.tokens.clone()
        reduce(total, "sum")
        for s in self.table:
            s.rule.all_reduce(s, self.totals[s.name], n, total.double()[..., None], reduce)
        self.tokens = total

    def state_dict(self) -> dict[str, np.ndarray]:
        """The raw additive state as numpy arrays (what checkpoints store): ``tokens`` and each statistic's
        totals as ``<statistic>.<state>``."""
        self.side.join()
        state = {"tokens": self.tokens.cpu().numpy()}
        for name, own in self.totals.items():
            state.update({f"{name}.{s}": t.cpu().numpy() for s, t in own.items()})
        return state

    @classmethod
    def from_state(
        cls,
        state: dict[str, np.ndarray],
        k: int,
        stats: tuple[str, ...],
        device: torch.device | str = "cpu",
        backend: str = "torch",
        activation: str = "gelu",
        precision: str = "fp32",
        overlap: bool | None = None,
        design: str | None = None,
    ) -> "Accumulator":
        """An accumulator holding a checkpoint's ``state`` (:meth:`state_dict`)."""
        table = statistics(stats)
        state = _namespaced(state, table)
        layers, labels = state["tokens"].shape
        width = state[f"{table[0].name}.{table[0].states[0]}"].shape[-1]
        top = next((state[f"{s.name}.{s.states[0]}"].shape[1] for s in table if s.axis == "top"), 16)
        acc = cls(layers, labels, width, k, stats, device, backend, activation, precision, top, overlap, design)
        for key, value in state.items():
            name, _, own = key.partition(".")
            (acc.tokens if key == "tokens" else acc.totals[name][own]).copy_(torch.from_numpy(np.asarray(value)))
        return acc

    def compute(self) -> dict[str, np.ndarray]:
        """The store variables: ``frames`` (tokens per label) and each statistic's, with its fill where a
        label has no tokens."""
        self.side.join()
        tokens = self.tokens.cpu().numpy()
        if not (tokens == tokens[:1]).all():
            raise RuntimeError("layers saw different tokens: a batch was added to some layers only")
        n = tokens[0].astype(np.float64)[None, :, None]
        out = {"frames": tokens[0]}
        for s in self.table:
            totals = {state: t.cpu().numpy() for state, t in self.totals[s.name].items()}
            for var, value in s.rule.to_store(s, totals, n).items():
                out[var] = value if s.fill == 0 or s.axis != "label" else np.where(n == 0, s.fill, value)
        return out


def state_from_store(variables: dict[str, np.ndarray], stats: tuple[str, ...], num_layers: int) -> dict:
    """The accumulator state of a complete store's variables (each statistic's rule inverts its store form)."""
    frames = variables["frames"]
    n = frames.astype(np.float64)[None, :, None]
    state = {"tokens": np.broadcast_to(frames, (num_layers, len(frames))).copy()}
    for name in stats:
        s = TABLE[name]
        state.update({f"{name}.{k}": v for k, v in s.rule.from_store(s, variables, n).items()})
    return state


_RENAMED = {"top_frames.top_frame": "top_frames.top_id"}
"""Checkpoint keys of states renamed since (the packed frame ids were called ``top_frame``, the name of
the store variable holding the frame index)."""


def _namespaced(state: dict[str, np.ndarray], table) -> dict[str, np.ndarray]:
    """A state with every total keyed ``<statistic>.<state>`` by today's names; checkpoints written before
    the namespaces keyed them by state name alone (unique then, as the table's test keeps them)."""
    owner = {own: s.name for s in table for own in s.states} | {"top_frame": "top_frames"}
    keyed = {key if key == "tokens" or "." in key else f"{owner[key]}.{key}": v for key, v in state.items()}
    return {_RENAMED.get(key, key): v for key, v in keyed.items()}
