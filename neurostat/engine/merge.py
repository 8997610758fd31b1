"""``neurostat merge``: exact merge of partial stores (shards of a corpus, ranks, separate runs)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import xarray as xr

from ..declarations import store_dims
from ..files import check_out_folder
from ..labelspace import LabelSpace
from ..store import (
    Progress,
    StoreError,
    StoreMeta,
    StoreWriter,
    fingerprint_differences,
    is_store,
    load_done,
    read_variable,
    verify_store,
)
from .accumulate import Accumulator, state_from_store

_SHARD_FREE = ("shard",)


def store_state(path: str | Path, stats: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The additive accumulator state of a complete store (each statistic's rule inverts its store form)."""
    ds = xr.open_zarr(path, consolidated=False)
    values = {name: read_variable(path, name, lambda v=ds[name]: v.values) for name in ds.data_vars}
    return state_from_store(values, stats, ds.sizes["layer"])


def merge_stores(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> StoreMeta:
    """Merges complete stores collected with the same settings into ``out``; returns its metadata."""
    if len(paths) < 2:
        raise StoreError("merge needs at least two stores")
    out = check_out_folder(out, "neurostat store", is_store, paths)
    if is_store(out) and not overwrite:
        raise StoreError(f"{out} already exists; pass --overwrite to replace it")
    metas = [StoreMeta.read(p) for p in paths]
    for p in paths:
        verify_store(p)
    for p, m in zip(paths, metas):
        if not m.complete:
            raise StoreError(f"{p} is not complete; finish it with --resume before merging")
    ref = {k: v for k, v in metas[0].fingerprint.items() if k not in _SHARD_FREE}
    for p, m in zip(paths[1:], metas[1:]):
        other = {k: v for k, v in m.fingerprint.items() if k not in _SHARD_FREE}
        diff = fingerprint_differences(ref, other, "the first has", "this one")
        if diff:
            raise StoreError(
                f"{p} differs from {paths[0]} in {'; '.join(diff)}; only stores collected with the same "
                f"model, statistics, labels and corpus can be merged"
            )
    done: list[str] = []
    seen: dict[str, str] = {}
    for p in paths:
        for uid in load_done(p):
            if uid in seen:
                raise StoreError(
                    f"utterance {uid} is counted in both {seen[uid]} and {p}: merging would count it twice"
                )
            seen[uid] = str(p)
            done.append(uid)
    first = metas[0]
    acc = Accumulator.from_state(store_state(paths[0], first.stats), first.k, first.stats)
    for p in paths[1:]:
        acc.merge(Accumulator.from_state(store_state(p, first.stats), first.k, first.stats))
    coords = {"layer": np.asarray(first.layers, dtype=np.int64), **LabelSpace.from_dict(first.labels).names()}
    ds = xr.open_zarr(paths[0], consolidated=False)
    for name in ("ffn", "utterance"):  # the layer axis's names, the corpus's utterance ids
        if name in ds.coords:
            coords[name] = np.asarray([str(u) for u in ds[name].values])
    if "original_neuron" in ds.coords:  # a pruned model's neurons' original indices
        coords["original_neuron"] = ds["original_neuron"].values
    progress = Progress.total([m.progress for m in metas])
    progress.complete = True
    command = shlex.join(["neurostat", "merge", *(str(Path(p)) for p in paths), "--out", str(out)])
    merged = first.merged(paths, progress, len(done), command)
    with StoreWriter(out, merged, overwrite=overwrite) as store:
        store.finalize(acc.compute(), coords, merged, done, dims=store_dims(first.stats))
    return merged.replace(complete=True)
