"""Reading a statistics store: ``open_stats(path)`` and marginals over the joint label.

The store counts on joint labels phone × gender × pitch bin (× any attached label set); a marginal
such as ``("gender", "phone")`` sums the counts (and pools the moments) over the other parts.

>>> stats = open_stats("stats.zarr")
>>> p = stats.probability("topk", by=("gender", "phone"))   # dims: layer, gender, phone, neuron
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .labels.joint import LabelSpace
from .store import StoreError, read_attrs

_STAT_VARS = {"topk": "topk_count", "positive": "positive_count"}


class Stats:
    """A complete statistics store opened lazily with xarray."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.attrs = read_attrs(self.path)
        if not self.attrs.get("complete"):
            done = self.attrs.get("progress", {}).get("utterances_done", "?")
            raise StoreError(
                f"{self.path} is not complete (a collection is running or was interrupted, {done} "
                f"utterances checkpointed); finish it with `neurostat collect ... --resume`"
            )
        self.ds = xr.open_zarr(self.path, consolidated=False)
        self.label_space = LabelSpace.from_dict(self.attrs["labels"])
        self.k = int(self.attrs["statistics"]["k"])
        self.width = int(self.ds.sizes["neuron"])
        self.layers = [int(v) for v in self.ds["layer"].values]

    @property
    def chance(self) -> float:
        """The paper's chance level r = k / D."""
        return self.k / self.width

    def _need(self, var: str) -> xr.DataArray:
        if var not in self.ds:
            have = [v for v in ("topk_count", "positive_count", "mean", "var") if v in self.ds]
            raise StoreError(
                f"{self.path} has no {var!r} (collected: {', '.join(have)}); re-collect with --stat for it"
            )
        return self.ds[var]

    @property
    def parts(self) -> tuple[str, ...]:
        """The label parts of the joint label (phone, gender, pitch_bin and any attached label set)."""
        return self.label_space.parts

    def level(self, part: str) -> str:
        """``frame`` or ``utterance``: whether ``part`` labels frames or whole utterances."""
        if part == "gender":
            return "utterance"
        return self.attrs.get("label_sets", {}).get(part, {}).get("level", "frame")

    def _parts(self, by: tuple[str, ...]) -> tuple[tuple[int, ...], list[int]]:
        """Axes of the label parts to sum away (in a [layer, *parts, neuron] array) and the order of ``by``."""
        parts = self.parts
        for part in by:
            if part not in parts:
                raise ValueError(f"{self.path} has no label part {part!r}; its parts are {', '.join(parts)}")
        if len(set(by)) != len(by):
            raise ValueError(f"label parts repeat in {by}")
        drop = tuple(1 + i for i, p in enumerate(parts) if p not in by)
        kept = [p for p in parts if p in by]
        return drop, [1 + kept.index(p) for p in by]

    def _expand(self, values: np.ndarray) -> np.ndarray:
        """[layer, label, neuron] (or [label]) → [layer, *parts, neuron] (or [1, *parts, 1])."""
        if values.ndim == 1:
            return values.reshape((1, *self.label_space.shape, 1))
        return values.reshape((values.shape[0], *self.label_space.shape, values.shape[-1]))

    def _finish(self, summed: np.ndarray, by: tuple[str, ...]) -> np.ndarray:
        drop, order = self._parts(by)
        squeezed = summed.squeeze(axis=drop) if drop else summed
        return squeezed.transpose([0, *order, squeezed.ndim - 1])

    def _coords(self, by: tuple[str, ...]) -> dict:
        return {"layer": self.layers, **{p: list(self.label_space.vocab(p)) for p in by}}

    def frames(self, by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Token counts per marginal label."""
        by = tuple(by)
        drop, _ = self._parts(by)
        values = self._finish(self._expand(self.ds["frames"].values).sum(axis=drop, keepdims=True), by)[0, ..., 0]
        return xr.DataArray(values, dims=list(by), coords={p: list(self.label_space.vocab(p)) for p in by})

    def counts(self, stat: str = "topk", by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Activation counts per layer, marginal label and neuron (``stat``: topk or positive)."""
        if stat not in _STAT_VARS:
            raise ValueError(f"unknown statistic {stat!r}; choose from {tuple(_STAT_VARS)}")
        by = tuple(by)
        drop, _ = self._parts(by)
        values = self._finish(self._expand(self._need(_STAT_VARS[stat]).values).sum(axis=drop, keepdims=True), by)
        return xr.DataArray(values, dims=["layer", *by, "neuron"], coords=self._coords(by))

    def probability(self, stat: str = "topk", by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Activating probability P(j | label) = count / frames (NaN where a label has no tokens)."""
        counts = self.counts(stat, by)
        frames = self.frames(by)
        return counts / frames.where(frames > 0)

    def moments(self, by: tuple[str, ...] = ("phone",)) -> tuple[xr.DataArray, xr.DataArray]:
        """Pooled (mean, var) per layer, marginal label and neuron, combined exactly from the joint labels."""
        by = tuple(by)
        drop, _ = self._parts(by)
        n = self._expand(self.ds["frames"].values.astype(np.float64))
        mean = np.nan_to_num(self._expand(self._need("mean").values))
        var = np.nan_to_num(self._expand(self._need("var").values))
        total = n.sum(axis=drop, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            pooled = (n * mean).sum(axis=drop, keepdims=True) / total
            m2 = (n * (var + (mean - pooled) ** 2)).sum(axis=drop, keepdims=True)
            pooled_var = m2 / total
        dims = ["layer", *by, "neuron"]
        return (
            xr.DataArray(self._finish(pooled, by), dims=dims, coords=self._coords(by)),
            xr.DataArray(self._finish(pooled_var, by), dims=dims, coords=self._coords(by)),
        )


def open_stats(path: str | Path) -> Stats:
    """Opens a complete statistics store."""
    return Stats(path)
