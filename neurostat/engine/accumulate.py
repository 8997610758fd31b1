"""Additive per-(layer, label, neuron) statistics: ``update(layer, x, batch)``, ``merge``, ``compute``.

State (all additive, so shards, ranks and resumed runs merge into the same totals):

- ``frames[label]``: number of tokens with that label (int64);
- ``topk[layer, label, neuron]``: tokens at which |a_j| is among the top k of the layer (int64).
  Ties at the k-th value go to the lower neuron index;
- ``positive[layer, label, neuron]``: tokens with a_j > 0 (int64);
- ``mean``, ``m2``: per-label mean and sum of squared deviations (float64).  Each batch's sums
  Σ(a − c) and Σ(a − c)² are taken around a per-neuron shift c (the layer's mean over the first
  batch) in fp32 (fp64 for fp64 activations) and merged into the float64 totals with Chan et al.'s
  pairwise formula — never a naive fp32 running sum over the corpus.

Per-batch counts are summed in fp32 (exact below 2**24 tokens per batch) and added to int64 totals.
Three backends fill the same state: ``torch`` (the reference path: index_add/bincount on CPU, no
host sync on CUDA), ``triton`` (the model's own GEMM and activation, then the ``topk_stats`` kernels
over the token rows; activations bit-identical to the torch path) and ``triton-fused`` (the
``ffn_up_stats`` kernel computes the GEMM and activation itself with positive counts and moments in
its epilogue; ``topk_stats`` adds the top-k counts).  Both Triton backends merge each layer's batch
sums into the totals with the ``merge_sums`` kernel; the torch backend with torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STATS = ("topk", "positive", "moments")
BACKENDS = ("torch", "triton", "triton-fused")
_EXACT_FP32 = 2**24


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


def chunk_tokens(rows: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 32) -> tuple[torch.Tensor, ...]:
    """Sorts token rows by label and cuts them into same-label chunks of at most ``chunk_rows`` rows.

    Returns (sorted rows int32 [N], their labels int32 [N], chunk starts int32 [C + 1], chunk labels
    int32 [C]): the work list of the ``topk_stats`` kernels, in their argument order, built on the host.
    """
    order = torch.argsort(labels, stable=True)
    rows, labels = rows[order], labels[order]
    n = labels.numel()
    new_label = torch.ones(n, dtype=torch.bool)
    if n:
        new_label[1:] = labels[1:] != labels[:-1]
    run_start = torch.nonzero(new_label).flatten()
    position = torch.arange(n) - run_start[torch.cumsum(new_label.long(), 0) - 1]
    starts = torch.nonzero(new_label | (position % chunk_rows == 0)).flatten()
    bounds = torch.cat([starts, torch.tensor([n])]).to(torch.int32)
    labels = labels.to(torch.int32)
    return rows.to(torch.int32), labels, bounds, labels[starts]


def merge_sums_reference(
    sums: dict[str, torch.Tensor],
    labels: torch.Tensor,
    counts: torch.Tensor,
    frames: torch.Tensor,
    shift: torch.Tensor | None,
    totals: dict[str, torch.Tensor],
) -> None:
    """Merges one batch's per-label sums [U, D] into one layer's totals [num_labels, D], in place (torch).

    ``labels`` (U,) are the rows of the totals, ``counts`` (U,) their tokens in the batch, ``frames`` the
    tokens per label before the batch.  Counts (``topk``, ``positive``) are added; the shifted sums
    s1 = Σ(a − shift), s2 = Σ(a − shift)² become the batch's mean and sum of squared deviations, merged
    into ``mean`` and ``m2`` in float64 with Chan et al.'s formula.
    """
    for name in ("topk", "positive"):
        if name in totals:
            totals[name].index_add_(0, labels, sums[name].to(torch.int64))
    if "mean" not in totals:
        return
    mean_t, m2_t = totals["mean"], totals["m2"]
    n_b = counts.to(torch.float64)[:, None]
    n_a = frames.index_select(0, labels).to(torch.float64)[:, None]
    n = n_a + n_b
    offset = sums["s1"].to(torch.float64, copy=True).div_(n_b)  # batch mean − shift
    m2_b = sums["s2"].to(torch.float64, copy=True).addcmul_(offset, offset * n_b, value=-1)  # Σ(a − batch mean)²
    delta = offset.add_(shift.double()).sub_(mean_t.index_select(0, labels))
    mean = mean_t.index_select(0, labels).addcmul_(delta, n_b / n)
    m2 = m2_t.index_select(0, labels).add_(m2_b).addcmul_(delta.square_(), n_a * n_b / n)
    mean_t.index_copy_(0, labels, mean)
    m2_t.index_copy_(0, labels, m2)


_FIELDS = ("index", "local", "labels", "counts", "sorted_rows", "chunk_starts", "chunk_labels", "perm", "sorted_local")


@dataclass
class TokenBatch:
    """The tokens of one batch: positions in the flattened [B*T] activations and compacted labels."""

    index: torch.Tensor  # (N,) int64: positions b * T + t
    local: torch.Tensor  # (N,) int64: position of each token's label in ``labels``
    labels: torch.Tensor  # (U,) int64: the distinct joint labels of the batch
    counts: torch.Tensor  # (U,) int64: tokens per label
    sorted_rows: torch.Tensor  # (N,) int32: token positions sorted by label (Triton work list)
    chunk_starts: torch.Tensor  # (C + 1,) int32
    chunk_labels: torch.Tensor  # (C,) int32: local label of each chunk
    perm: torch.Tensor  # (B*T,) int32: sorted token rows, then every other row (fused GEMM order)
    sorted_local: torch.Tensor  # (N,) int32: local label of each sorted token row

    @classmethod
    def from_labels(cls, flat: np.ndarray) -> "TokenBatch":
        """From the flattened per-frame joint labels of a padded batch (−1 = not a token)."""
        index = np.flatnonzero(flat >= 0)
        labels, local, counts = np.unique(flat[index], return_inverse=True, return_counts=True)
        if len(index) >= _EXACT_FP32:
            raise ValueError(
                f"{len(index)} tokens in one batch: use smaller batches (fp32 counts are exact below 2**24)"
            )
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
        index, local = t(index), t(local)
        sorted_rows, sorted_local, starts, chunk_labels = chunk_tokens(index, local)
        others = torch.from_numpy(np.flatnonzero(flat < 0).astype(np.int32))
        return cls(
            index,
            local,
            t(labels),
            t(counts),
            sorted_rows,
            starts,
            chunk_labels,
            torch.cat([sorted_rows, others]),
            sorted_local,
        )

    @property
    def num_tokens(self) -> int:
        return self.index.numel()

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).to(device, non_blocking=True) for f in _FIELDS))

    def pin_memory(self) -> "TokenBatch":
        return TokenBatch(*(getattr(self, f).pin_memory() for f in _FIELDS))


class Accumulator:
    """Additive statistics for ``num_layers`` layers × ``num_labels`` labels × ``width`` neurons."""

    def __init__(
        self,
        num_layers: int,
        num_labels: int,
        width: int,
        k: int,
        stats: tuple[str, ...] = STATS,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        activation: str = "gelu",
    ):
        unknown = set(stats) - set(STATS)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; choose from {STATS}")
        if not 1 <= k <= width:
            raise ValueError(f"top-k needs 1 <= k <= width, got k={k}, width={width}")
        self.shape = (num_layers, num_labels, width)
        self.k, self.stats, self.device = k, tuple(s for s in STATS if s in stats), torch.device(device)
        self.backend, self.activation = backend, activation
        z = lambda dtype: torch.zeros(self.shape, dtype=dtype, device=self.device)  # noqa: E731
        self.frames = torch.zeros(num_labels, dtype=torch.int64, device=self.device)
        self.topk = z(torch.int64) if "topk" in self.stats else None
        self.positive = z(torch.int64) if "positive" in self.stats else None
        self.mean = z(torch.float64) if "moments" in self.stats else None
        self.m2 = z(torch.float64) if "moments" in self.stats else None
        self.shift: list[torch.Tensor | None] = [None] * num_layers

    def update(self, layer: int, a: torch.Tensor, batch: TokenBatch) -> None:
        """Adds the token rows ``a[batch.index]`` of one layer's activations ``a`` [B*T, D].

        Call :meth:`add_frames` once per batch after every layer has been updated.
        """
        if self.backend == "torch":
            sums = self._torch_sums(layer, a.index_select(0, batch.index), batch)
        else:
            sums = self._kernel_sums(
                layer,
                a,
                batch,
                topk=self.topk is not None,
                positive=self.positive is not None,
                moments=self.mean is not None,
            )
        self.add_sums(layer, batch, sums)

    def ffn_activation(self, layer: int, ffn, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``act(W1 x + b1)`` of one FFN with its statistics added; with ``triton-fused`` both come from
        the ``ffn_up_stats`` kernel (the layer's first batch runs unfused to set the moment shift)."""
        shape = hidden.shape
        if self.backend != "triton-fused" or (self.mean is not None and self.shift[layer] is None):
            a = ffn.act(ffn.up(hidden))
            self.update(layer, a.reshape(-1, a.shape[-1]), batch)
            return a
        from ..kernels.ffn_up_stats import ffn_up_stats

        epilogue = self.positive is not None or self.mean is not None
        a, sums = ffn_up_stats(
            hidden.reshape(-1, shape[-1]),
            ffn.up.weight,
            ffn.up.bias,
            self.activation,
            batch.perm,
            batch.sorted_local,
            batch.labels.numel(),
            self.shift[layer],
            stats=epilogue,
        )
        if self.topk is not None:
            sums.update(self._kernel_sums(layer, a, batch, topk=True, positive=False, moments=False))
        self.add_sums(layer, batch, sums)
        return a.view(*shape[:-1], a.shape[-1])

    def _kernel_sums(
        self, layer: int, a: torch.Tensor, batch: TokenBatch, topk: bool, positive: bool, moments: bool
    ) -> dict[str, torch.Tensor]:
        from ..kernels.topk_stats import topk_stats

        if moments and self.shift[layer] is None:
            self.shift[layer] = a.index_select(0, batch.index).mean(0, dtype=torch.float32)
        return topk_stats(
            a,
            batch.sorted_rows,
            batch.sorted_local,
            batch.chunk_starts,
            batch.chunk_labels,
            batch.labels.numel(),
            self.k,
            self.shift[layer],
            topk=topk,
            positive=positive,
            moments=moments,
        )

    def _torch_sums(self, layer: int, x: torch.Tensor, batch: TokenBatch) -> dict[str, torch.Tensor]:
        """The per-label sums of the token rows ``x`` [N, D] with torch ops (the reference path)."""
        sums = {}
        if self.topk is not None:
            sums["topk"] = self._topk_counts(x, batch)
        if self.positive is not None:
            sums["positive"] = self._per_label(batch, (x > 0).to(torch.float32))
        if self.mean is not None:
            dtype = torch.promote_types(x.dtype, torch.float32)
            if self.shift[layer] is None:
                self.shift[layer] = x.mean(0, dtype=dtype)
            dev = x.to(dtype) - self.shift[layer].to(dtype)
            sums["s1"] = self._per_label(batch, dev)
            sums["s2"] = self._per_label(batch, dev.square_())
        return sums

    def add_sums(self, layer: int, batch: TokenBatch, sums: dict[str, torch.Tensor]) -> None:
        """Adds one batch's per-label sums [U, D] (counts ``topk``, ``positive``; shifted ``s1``, ``s2``):
        torch ops on the torch backend, the ``merge_sums`` kernel (one launch) on the Triton backends."""
        names = ("topk", "positive", "mean", "m2")
        totals = {name: getattr(self, name)[layer] for name in names if getattr(self, name) is not None}
        if self.backend == "torch":
            merge = merge_sums_reference
        else:
            from ..kernels.merge_sums import merge_sums as merge
        merge(sums, batch.labels, batch.counts, self.frames, self.shift[layer], totals)

    def _topk_counts(self, x: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """Top-k counts per batch label [U, D] (int64).

        On CPU the k+1 largest values show which rows have a tie at the k-th value: only those rows
        need the exact mask; the others are counted from the top-k indices.  On GPU the exact mask is
        computed for every row, so nothing waits on the host.
        """
        width, k = x.shape[1], self.k
        if x.device.type != "cpu" or k == width:
            return self._per_label(batch, topk_mask(x, k).to(torch.float32)).to(torch.int64)
        values, idx = x.abs().topk(k + 1, dim=1)
        tied = values[:, k - 1] == values[:, k]
        flat = (batch.local[:, None] * width + idx[:, :k])[~tied].flatten()
        counts = torch.bincount(flat, minlength=batch.labels.numel() * width).view(-1, width)
        rows = torch.nonzero(tied).flatten()
        if rows.numel():
            counts.index_add_(0, batch.local[rows], topk_mask(x[rows], k).to(torch.int64))
        return counts

    def _per_label(self, batch: TokenBatch, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((batch.labels.numel(), values.shape[1]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, batch.local, values)

    def add_frames(self, batch: TokenBatch) -> None:
        self.frames.index_add_(0, batch.labels, batch.counts)

    def merge(self, other: "Accumulator") -> "Accumulator":
        """Adds ``other``'s totals into this one (exact for counts, Chan's formula for moments)."""
        if other.shape != self.shape or other.k != self.k or other.stats != self.stats:
            raise ValueError(
                f"cannot merge accumulators of shape/k/stats {other.shape}/{other.k}/{other.stats} "
                f"into {self.shape}/{self.k}/{self.stats}"
            )
        other_frames = other.frames.to(self.device)
        if self.mean is not None:
            n_a, n_b = self.frames.double()[None, :, None], other_frames.double()[None, :, None]
            n = (n_a + n_b).clamp(min=1)
            delta = other.mean.to(self.device) - self.mean
            self.mean += delta * (n_b / n)
            self.m2 += other.m2.to(self.device) + delta * delta * (n_a * n_b / n)
        for mine, theirs in ((self.topk, other.topk), (self.positive, other.positive)):
            if mine is not None:
                mine += theirs.to(self.device)
        self.frames += other_frames
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """The raw additive state as numpy arrays (what checkpoints store)."""
        names = ("frames", "topk", "positive", "mean", "m2")
        return {n: getattr(self, n).cpu().numpy() for n in names if getattr(self, n) is not None}

    @classmethod
    def from_state(
        cls,
        state: dict[str, np.ndarray],
        k: int,
        device: torch.device | str = "cpu",
        backend: str = "torch",
        activation: str = "gelu",
    ) -> "Accumulator":
        stats = tuple(s for s, key in (("topk", "topk"), ("positive", "positive"), ("moments", "mean")) if key in state)
        shape = next(state[n].shape for n in ("topk", "positive", "mean") if n in state)
        acc = cls(shape[0], shape[1], shape[2], k, stats, device, backend, activation)
        for name, value in state.items():
            getattr(acc, name).copy_(torch.from_numpy(np.asarray(value)))
        return acc

    def compute(self) -> dict[str, np.ndarray]:
        """Store variables: frames, topk_count, positive_count, mean and var (ddof 0; NaN without tokens)."""
        out = {"frames": self.frames.cpu().numpy()}
        if self.topk is not None:
            out["topk_count"] = self.topk.cpu().numpy()
        if self.positive is not None:
            out["positive_count"] = self.positive.cpu().numpy()
        if self.mean is not None:
            n = self.frames.double()[None, :, None]
            empty = (n == 0).expand_as(self.mean)
            out["mean"] = torch.where(empty, torch.nan, self.mean).cpu().numpy()
            out["var"] = torch.where(empty, torch.nan, self.m2 / n.clamp(min=1)).cpu().numpy()
        return out
