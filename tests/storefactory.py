"""Builds statistics stores from hand-made arrays, through the real store writer."""

import numpy as np

from neurostat.labelspace import LabelSpace
from neurostat.phones import PHONES
from neurostat.store import Progress, StoreMeta, StoreWriter

SPACE = LabelSpace.of({"phone": PHONES, "gender": ("M", "F"), "pitch_bin": ("low", "mid", "high", "unvoiced")})


def make_store(
    path,
    frames: np.ndarray,
    topk: np.ndarray | None = None,
    positive: np.ndarray | None = None,
    k: int = 2,
    space: LabelSpace = SPACE,
    label_sets: dict | None = None,
    store_format: int | None = None,
    **meta_changes,
):
    """frames [label], counts [layer, label, neuron] over the joint label space; ``store_format`` records
    another format than this version's (with the codecs of that format patched in by the test);
    ``meta_changes`` replace fields of the metadata (``fingerprint``, ``statistics``, ``corpus``)."""
    counts = topk if topk is not None else positive
    num_layers, _, width = counts.shape
    stats = [s for s, a in (("topk", topk), ("positive", positive)) if a is not None]
    meta = StoreMeta(
        fingerprint={"layers": list(range(1, num_layers + 1))},
        model={
            "model": "hand-made",
            "revision": None,
            "model_type": "hubert",
            "num_layers": num_layers,
            "width": width,
        },
        statistics={"stats": stats, "k": k, "topk_ratio": k / width, "tokens": "phone-mid", "backend": "torch"},
        labels=space.to_dict(),
        label_sets=label_sets or {},
        pitch={"edges": [120.0, 180.0]},
        frame_labels="centre",
        phone_map=None,
        corpus={"root": "-", "subset": "-", "shard": "0/1"},
        batching={},
        versions={},
        command="",
        progress=Progress(
            utterances_done=1,
            frames=int(frames.sum()),
            tokens=int(frames.sum()),
            audio_seconds=1.0,
            elapsed_seconds=1.0,
        ),
        version="test",
    )
    if store_format is not None:
        meta = meta.replace(format=store_format)
    meta = meta.replace(**{k: {**getattr(meta, k), **v} for k, v in meta_changes.items()})
    arrays = {"frames": frames.astype(np.int64)}
    if topk is not None:
        arrays["topk_count"] = topk.astype(np.int64)
    if positive is not None:
        arrays["positive_count"] = positive.astype(np.int64)
    coords = {"layer": np.arange(1, num_layers + 1), **space.names()}
    with StoreWriter(path, meta) as w:
        w.finalize(arrays, coords, meta, ["utt"])
    return path


def joint(phone: str, gender: str, pitch: str = "low", space: LabelSpace = SPACE, **extra: str) -> int:
    """Joint id of one label (``extra``: labels of further parts of ``space``)."""
    names = {"phone": phone, "gender": gender, "pitch_bin": pitch, **extra}
    return int(space.encode({p: space.vocab(p).index(names[p]) for p in space.parts}))
