"""Reading a statistics store: ``open_stats(path)`` and marginals over the joint label.

The store counts on joint labels phone × gender × pitch bin (× any attached label set); a marginal
such as ``("gender", "phone")`` reduces each variable over the other parts by the merge rule the store
records for it: counts are summed, moments pooled exactly, maxima maximised.

>>> stats = open_stats("stats.zarr")
>>> p = stats.probability("topk", by=("gender", "phone"))   # dims: layer, gender, phone, neuron
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import xarray as xr

from .declarations import count_variable, statistic_of
from .frames import FrameGeometry
from .labelspace import LabelSpace
from .moments import pool
from .store import (
    FORMAT,
    StoreError,
    StoreMeta,
    checkpoint_progress,
    fingerprint_differences,
    read_variable,
    verify_store,
)


class Stats:
    """A complete statistics store: its metadata (:attr:`meta`) and the xarray Dataset (:attr:`ds`); each
    accessor reads the variables it needs whole (a store's variables fit in memory by design)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta = StoreMeta.read(self.path)
        if not self.meta.complete:
            progress = checkpoint_progress(self.path) or self.meta.progress
            done = f"{progress.utterances_done} utterances checkpointed" if progress else "no checkpoint yet"
            what = "a merge is running or was interrupted" if self.meta.merged_from else (
                f"a collection is running or was interrupted, {done}"
            )
            raise StoreError(f"{self.path} is not complete ({what}); {self.meta.how_to_finish}")
        verify_store(self.path)
        self.ds = xr.open_zarr(self.path, consolidated=False)
        self.label_space = LabelSpace.from_dict(self.meta.labels)
        self.k = self.meta.k
        self.width = int(self.ds.sizes["neuron"])
        self.layers = [int(v) for v in self.ds["layer"].values]
        """The collected entries of the layer axis (1-based; one per FFN: a Conformer layer has two)."""
        self.names = dict(zip(self.layers, self.meta.entry_names, strict=True))
        """Each collected entry's name: ``3``, or ``3.ffn1`` and ``3.ffn2`` for a Conformer."""

    def original_neurons(self, layer: int) -> np.ndarray:
        """The collected neurons of the entry ``layer`` as indices of the model they come from: for a pruned
        model's store its ``original_neuron`` coordinate (the neurons pruning kept), else 0..width-1."""
        if "original_neuron" not in self.ds.coords:
            return np.arange(self.width)
        return np.asarray(self.ds["original_neuron"].values[self.layers.index(layer)], dtype=np.int64)

    @property
    def num_entries(self) -> int:
        """The model's entries of the layer axis (its FFNs), collected or not."""
        model = self.meta.model
        return int(model.get("num_entries", model["num_layers"]))

    @property
    def chance(self) -> float:
        """The paper's chance level r = k / D."""
        return self.k / self.width

    def _need(self, var: str) -> xr.DataArray:
        if var not in self.ds:
            have = [v for v in self.ds.data_vars if v != "frames"]
            stat = statistic_of(var)
            raise StoreError(
                f"{self.path} has no {var!r} (collected: {', '.join(have)}); collect it again with `--stat {stat}` "
                f"(beside the others it needs: --stat {' --stat '.join(self.meta.stats)})"
            )
        return self.ds[var]

    def _values(self, var: str) -> np.ndarray:
        """The variable's values; a chunk that does not decode is an error naming it, not a traceback."""
        array = self._need(var)
        return read_variable(self.path, var, lambda: array.values)

    def check(self) -> None:
        """Reads every variable once: each chunk decodes (in format 3 with its checksum verified) or the
        error names it."""
        for var in self.ds.data_vars:
            self._values(str(var))

    def corpus_differences(self, digests: dict[str, str | None]) -> list[str]:
        """How a prepared corpus's content digests (:meth:`PreparedCorpus.content_digests` of :attr:`parts`)
        differ from those of the corpus this store counted, one readable item each; empty when they match
        or the store was collected before corpus digests were recorded."""
        recorded = self.meta.fingerprint.get("corpus_content")
        return [] if recorded is None else fingerprint_differences(recorded, digests, "the store's", "this corpus")

    @property
    def parts(self) -> tuple[str, ...]:
        """The label parts of the joint label (phone, gender, pitch_bin and any attached label set)."""
        return self.label_space.parts

    def level(self, part: str) -> str:
        """``frame`` or ``utterance``: whether ``part`` labels frames or whole utterances."""
        if part == "gender":
            return "utterance"
        return self.meta.label_sets.get(part, {}).get("level", "frame")

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

    def _coords(self, by: tuple[str, ...], layers: bool = True) -> dict:
        labels = {p: list(self.label_space.vocab(p)) for p in by}
        return {"layer": self.layers, **labels} if layers else labels

    def tokens(self, by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Token counts per marginal label (the store variable ``frames``)."""
        return self.reduce("frames", by)

    def reduce(self, var: str, by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Any variable over the joint labels — per (layer, label, neuron), or per label as ``frames`` — reduced
        to the marginal labels ``by`` by its merge rule (``sum`` for counts and sums, 0 where a marginal
        label has no tokens; ``max`` for maxima, NaN there)."""
        dims = self._need(var).dims
        if "label" not in dims:
            raise ValueError(
                f"{var!r} is over ({', '.join(dims)}), not over the labels: there is nothing to reduce by label; "
                f"read it as stats.ds[{var!r}]"
            )
        rule = self.meta.statistics.get("merge", {}).get(var, "sum")
        reducers = {"sum": np.add.reduce, "max": np.fmax.reduce}
        if rule not in reducers:
            raise ValueError(f"{var!r} merges by {rule!r}: read it with moments()")
        by = tuple(by)
        drop, _ = self._parts(by)
        values = self._expand(self._values(var))
        reduced = self._finish(reducers[rule](values, axis=drop, keepdims=True) if drop else values, by)
        if dims == ("label",):
            return xr.DataArray(reduced[0, ..., 0], dims=list(by), coords=self._coords(by, layers=False))
        return xr.DataArray(reduced, dims=["layer", *by, "neuron"], coords=self._coords(by))

    def counts(self, stat: str = "topk", by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Activation counts per layer, marginal label and neuron (``stat``: topk or positive)."""
        return self.reduce(count_variable(stat), by)

    def probability(self, stat: str = "topk", by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Activating probability P(j | label) = count / tokens (NaN where a label has no tokens)."""
        counts = self.counts(stat, by)
        tokens = self.tokens(by)
        return counts / tokens.where(tokens > 0)

    def max_abs(self, by: tuple[str, ...] = ("phone",)) -> xr.DataArray:
        """Largest |a| per layer, marginal label and neuron (collected with ``--stat max_abs``)."""
        return self.reduce("max_abs", by)

    def moments(self, by: tuple[str, ...] = ("phone",)) -> tuple[xr.DataArray, xr.DataArray]:
        """Pooled (mean, var) per layer, marginal label and neuron, combined exactly from the joint labels."""
        by = tuple(by)
        drop, _ = self._parts(by)
        n = self._expand(self._values("frames").astype(np.float64))
        mean = np.nan_to_num(self._expand(self._values("mean")))
        m2 = np.nan_to_num(self._expand(self._values("var"))) * n
        total, pooled, pooled_m2 = pool(n, mean, m2, drop)
        empty = total == 0
        dims = ["layer", *by, "neuron"]
        return (
            xr.DataArray(self._finish(np.where(empty, np.nan, pooled), by), dims=dims, coords=self._coords(by)),
            xr.DataArray(
                self._finish(np.where(empty, np.nan, pooled_m2 / (total + empty)), by),
                dims=dims,
                coords=self._coords(by),
            ),
        )

    @functools.cached_property
    def _top(self) -> tuple[np.ndarray, ...]:
        """The top-frame arrays and utterance ids, read once (a browser asks for thousands of neurons)."""
        names = ("top_value", "top_utterance", "top_frame")
        return (*(self._values(n) for n in names), self.ds["utterance"].values)

    def top_frames(self, layer: int, neuron: int) -> list[dict]:
        """The largest activations of neuron ``neuron`` of ``layer`` (1-based) over the corpus, largest first
        (collected with ``--top-frames``): value, utterance id, frame and the frame centre in seconds."""
        if layer not in self.layers:
            raise ValueError(f"{self.path} has layers {self.layers}, not {layer}")
        if not 0 <= neuron < self.width:
            raise ValueError(f"{self.path} has neurons 0..{self.width - 1}, not {neuron}")
        i = self.layers.index(layer)
        values, utterances, frames, ids = self._top
        value, utterance, frame = values[i, :, neuron], utterances[i, :, neuron], frames[i, :, neuron]
        geometry = FrameGeometry.from_dict(self.meta.model["geometry"])
        return [
            {
                "value": float(v),
                "utterance": str(ids[u]),
                "frame": int(f),
                "seconds": float(geometry.centres(f + 1)[-1]),
            }
            for v, u, f in zip(value, utterance, frame)
            if u >= 0
        ]


def open_stats(path: str | Path) -> Stats:
    """Opens a complete statistics store."""
    return Stats(path)


def _describe_forward(meta: StoreMeta) -> list[str]:
    """What the model's forward did, as the store records it (stores written before a field existed say
    what they have)."""
    b, s = meta.batching, meta.statistics
    frame_mask = b.get("frame_mask") or b.get("transformer", "?")
    where = f" on {b['device']}" if "device" in b else ""
    return [
        f"forward: {b.get('front_end', '?')} front end{where}; group norm: {b.get('group_norm', '?')}; "
        f"frame mask: {frame_mask}",
        f"precision: {meta.fingerprint.get('dtype', 'float32')} model; statistics {s.get('precision', '?')}; "
        f"moments: {s.get('moments', '?')}",
    ]


def describe_store(path: str | Path) -> str:
    """A readable summary of a store, complete or not (what `neurostat info` prints)."""
    meta = StoreMeta.read(path)
    m, s, pitch_meta = meta.model, meta.statistics, meta.pitch
    p = meta.progress
    labels = meta.labels
    pitch = ""
    if "pitch_bin" in labels:
        edges = ", ".join(f"{e:.2f}" for e in pitch_meta["edges"])
        pitch = f" (pitch bins {', '.join(labels['pitch_bin'])}; edges {edges} Hz)"
    quantiles = pitch_meta.get("quantiles")
    lines = [
        f"store: {path} ({'complete' if meta.complete else 'INCOMPLETE'}; neurostat {meta.version})",
        f"model: {m['model']} ({m['model_type']}, revision {m['revision']}), {m['num_layers']} layers x "
        + (f"{m['ffns_per_layer']} FFNs x " if m.get("ffns_per_layer", 1) > 1 else "")
        + f"{m['width']} FFN neurons"
        + (f"; {m['head']}" if m.get("head") else ""),
        f"layers collected: {', '.join(meta.entry_names)}",
        f"statistics: {', '.join(meta.stats)}; tokens {s['tokens']}; top-k k = {meta.k} (λ = {s['topk_ratio']}); backend {s['backend']}",
        *_describe_forward(meta),
        "labels: " + " x ".join(f"{len(v)} {part}" for part, v in labels.items()) + " joint labels" + pitch,
        f"corpus: {meta.corpus['root']}{' / ' + meta.corpus['subset'] if meta.corpus.get('subset') else ''} "
        f"(shard {meta.corpus['shard']})",
        f"labelling: frames by {meta.frame_labels or 'centre'}; pitch {pitch_meta.get('method')} "
        f"(step {1000 * pitch_meta.get('step_seconds', 0):g} ms, aligned by {pitch_meta.get('align', 'time')}), "
        f"bins by rule {pitch_meta.get('rule')}"
        f"{' at percentiles ' + ', '.join(f'{100 * q:g}' for q in quantiles) if quantiles else ''}; "
        f"final run of each utterance {'dropped' if s.get('drop_final_run') else 'kept'}",
    ]
    for name, entry in meta.label_sets.items():
        lines.append(f"label set {name}: {entry['level']} level, from {entry['source']}")
    if meta.complete:
        lines.append(
            f"counted: {p.counted} utterances, {p.audio_seconds / 3600:.3f} h, {p.frames:,} frames, "
            f"{p.tokens:,} tokens in {p.elapsed_seconds:.1f} s"
        )
    else:
        q = checkpoint_progress(path)
        lines.append(
            "no checkpoint yet"
            if q is None
            else f"checkpointed: {q.utterances_done} of {meta.corpus['utterances']} utterances, "
            f"{q.tokens:,} tokens; continue with `neurostat collect ... --resume`"
        )
        if meta.merged_from:
            lines[-1] = f"a merge of {len(meta.merged_from)} stores that did not finish; {meta.how_to_finish}"
    if p is not None and p.skips:
        lines.append("skipped during collect: " + ", ".join(f"{r} {n}" for r, n in sorted(p.skips.items())))
    if meta.complete:
        stats = open_stats(path)
        stats.check()
        for part in stats.parts:
            tokens = stats.tokens((part,))
            top = tokens.sortby(tokens, ascending=False)[:8]
            lines.append(
                f"tokens per {part}{' (top 8)' if tokens.size > 8 else ''}: "
                + ", ".join(f"{name} {int(n)}" for name, n in zip(top[part].values, top.values))
            )
    lines.append(f"command: {meta.command}")
    if meta.format < FORMAT:
        lines.append(
            f"note: store format {meta.format} has no checksum in its chunks (format {FORMAT} has): a bit flipped on "
            "disk can read back unnoticed; `neurostat info --verify` checks the files against the manifest"
        )
    return "\n".join(lines)
