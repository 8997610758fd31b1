"""``neurostat merge``: exact merge of partial stores (shards of a corpus, ranks, separate runs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from ..labelspace import LabelSpace
from ..store import StoreError, StoreWriter, load_done, read_attrs, verify_store
from .accumulate import Accumulator, state_from_store
from .statistics import store_dims

_SHARD_FREE = ("shard",)


def store_state(path: str | Path, stats: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The additive accumulator state of a complete store (each statistic's rule inverts its store form)."""
    ds = xr.open_zarr(path, consolidated=False)
    return state_from_store({name: ds[name].values for name in ds.data_vars}, stats, ds.sizes["layer"])


_SUMMED = (
    "utterances_done",
    "utterances_total",
    "frames",
    "padded_frames",
    "tokens",
    "audio_seconds",
    "elapsed_seconds",
    "data_wait_seconds",
)


def summed_progress(progress: list[dict]) -> dict:
    """The progress of several partial runs (shards, ranks) as one: counts, seconds and skips added."""
    out = {key: sum(p.get(key, 0) for p in progress) for key in _SUMMED}
    out["skips"] = {}
    for p in progress:
        for reason, n in p.get("skips", {}).items():
            out["skips"][reason] = out["skips"].get(reason, 0) + n
    return out


def merge_stores(paths: list[str | Path], out: str | Path, overwrite: bool = False) -> dict:
    """Merges complete stores collected with the same settings into ``out``; returns its attrs."""
    if len(paths) < 2:
        raise StoreError("merge needs at least two stores")
    attrs = [read_attrs(p) for p in paths]
    for p in paths:
        verify_store(p)
    for p, a in zip(paths, attrs):
        if not a.get("complete"):
            raise StoreError(f"{p} is not complete; finish it with --resume before merging")
    ref = {k: v for k, v in attrs[0]["fingerprint"].items() if k not in _SHARD_FREE}
    for p, a in zip(paths[1:], attrs[1:]):
        other = {k: v for k, v in a["fingerprint"].items() if k not in _SHARD_FREE}
        diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
        if diff:
            raise StoreError(
                f"{p} differs from {paths[0]} in {', '.join(diff)}; only stores collected with the same "
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
    k, stats = int(attrs[0]["statistics"]["k"]), tuple(attrs[0]["statistics"]["stats"])
    acc = Accumulator.from_state(store_state(paths[0], stats), k, stats)
    for p in paths[1:]:
        acc.merge(Accumulator.from_state(store_state(p, stats), k, stats))
    coords = {
        "layer": np.asarray(attrs[0]["fingerprint"]["layers"], dtype=np.int64),
        **LabelSpace.from_dict(attrs[0]["labels"]).names(),
    }
    if "top_frames" in stats:
        ids = xr.open_zarr(paths[0], consolidated=False)["utterance"].values.tolist()
        coords["utterance"] = np.asarray([str(u) for u in ids])
    progress = summed_progress([a["progress"] for a in attrs])
    fingerprint = {**attrs[0]["fingerprint"], "shard": "merged"}
    merged = {
        **attrs[0],
        "fingerprint": fingerprint,
        "complete": False,
        "progress": {**progress, "complete": True},
        "merged_from": [str(Path(p).resolve()) for p in paths],
        "corpus": {**attrs[0]["corpus"], "shard": "merged", "utterances": len(done)},
    }
    with StoreWriter(out, merged, overwrite=overwrite) as store:
        store.finalize(acc.compute(), coords, merged, done, dims=store_dims(stats))
    return merged
