"""``neurostat cluster``: label sets from k-means, as in the follow-up paper (Lin et al., 2025).

- ``frame``: k-means units of one Transformer layer's output (HuBERT-style targets), one per frame,
  fitted on a random sample of frames and then assigned to every frame of the corpus;
- ``utterance``: k-means of each utterance's mean layer output, or of given utterance vectors
  (i-vectors, x-vectors: ``<id> v1 v2 ...`` lines), one cluster per utterance.

The result is attached to the prepared corpus (:mod:`neurostat.corpus.labelsets`) so that ``collect``
counts on it and ``select`` groups by it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..corpus.labelsets import LEVELS, attach_label_set, check_name, read_id_lines
from ..corpus.prepared import LabelSetError, PreparedCorpus
from ..engine.device import model_dtype, resolve_device
from ..engine.features import layer_features
from ..errors import OptionError
from ..model.adapter import ModelAdapter
from ..model.loading import load_adapter
from .kmeans import assign, kmeans


def read_vectors(path: str | Path) -> dict[str, np.ndarray]:
    """Utterance vectors from ``<id> v1 v2 ...`` lines (all of one dimension)."""
    out: dict[str, np.ndarray] = {}
    for utt, (number, fields) in read_id_lines(path, "vector value").items():
        try:
            out[utt] = np.asarray(fields, dtype=np.float64)
        except ValueError:
            raise LabelSetError(f"{path}:{number}: not a vector of numbers after the utterance id") from None
        if len(out[utt]) != len(next(iter(out.values()))):
            raise LabelSetError(f"{path}:{number}: every vector needs the same dimension")
    return out


def cluster_vectors(
    corpus: PreparedCorpus, name: str, vectors_path: str | Path, clusters: int, seed: int = 0, allow_missing=False
) -> dict:
    """k-means of given utterance vectors → utterance-level label set ``name``."""
    check_name(name)
    vectors = read_vectors(vectors_path)
    ids = [r["id"] for r in corpus.records if r["id"] in vectors]
    if not ids:
        raise LabelSetError(f"{vectors_path}: none of its utterances is in {corpus.path}")
    x = torch.from_numpy(np.stack([vectors[u] for u in ids]))
    fit = kmeans(x, clusters, seed=seed)
    labels, _ = assign(x, fit.centroids)
    info = {
        "kmeans": {
            "vectors": str(vectors_path),
            "clusters": clusters,
            "seed": seed,
            "inertia": fit.inertia,
            "centroids": corpus.save_centroids(name, fit.centroids.double().cpu().numpy()),
        }
    }
    return attach_label_set(
        corpus,
        name,
        {u: labels[i : i + 1].numpy() for i, u in enumerate(ids)},
        "utterance",
        str(vectors_path),
        allow_missing,
        info,
    )


def cluster_features(
    corpus: PreparedCorpus,
    adapter: ModelAdapter,
    name: str,
    layer: int,
    clusters: int,
    level: str = "frame",
    fit_frames: int = 100_000,
    seed: int = 0,
    batch_seconds: float | None = None,
    num_jobs: int | None = None,
    progress: bool = True,
) -> dict:
    """k-means of layer ``layer``'s output → label set ``name`` (per frame, or per utterance mean)."""
    check_name(name)
    if level not in LEVELS:
        raise LabelSetError(f"unknown level {level!r}; choose one of {LEVELS}")
    every = list(range(len(corpus)))
    run = dict(batch_seconds=batch_seconds, num_jobs=num_jobs, progress=progress)
    if level == "utterance":
        ids, means = [], []
        for utt, feats in layer_features(corpus, adapter, every, [layer], **run):
            ids.append(utt)
            means.append(feats[:, 0].double().mean(0))
        x = torch.stack(means)
        fit = kmeans(x, clusters, seed=seed)
        labels = dict(zip(ids, assign(x, fit.centroids)[0].cpu().numpy()[:, None]))
    else:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(corpus))
        cumulative = np.cumsum([corpus.records[i]["num_frames"] for i in order])
        fit_set = sorted(order[: int(np.searchsorted(cumulative, fit_frames)) + 1].tolist())
        kept = {utt: f[:, 0] for utt, f in layer_features(corpus, adapter, fit_set, [layer], **run)}
        sample = torch.cat(list(kept.values()))
        if sample.shape[0] > fit_frames:
            pick = torch.from_numpy(np.sort(rng.choice(sample.shape[0], fit_frames, replace=False))).to(sample.device)
            sample = sample[pick]
        fit = kmeans(sample, clusters, seed=seed)
        labels = {u: assign(f, fit.centroids)[0].cpu().numpy() for u, f in kept.items()}
        del kept, sample
        rest = sorted(set(every) - set(fit_set))
        for utt, feats in layer_features(corpus, adapter, rest, [layer], **run):
            labels[utt] = assign(feats[:, 0], fit.centroids)[0].cpu().numpy()
    info = {
        "kmeans": {
            "model": adapter.source,
            "revision": adapter.revision,
            "layer": layer,
            "clusters": clusters,
            "seed": seed,
            "fit_frames": None if level == "utterance" else fit_frames,
            "inertia": fit.inertia,
            "iterations": fit.iterations,
            "centroids": corpus.save_centroids(name, fit.centroids.double().cpu().numpy()),
        }
    }
    source = f"k-means of {adapter.source} layer {layer} ({'utterance means' if level == 'utterance' else 'frames'})"
    return attach_label_set(corpus, name, labels, level, source, info=info)


def _check_feature_options(
    corpus: PreparedCorpus, clusters: int, level: str, layer: int, fit_frames: int, batch_seconds: float | None
) -> None:
    """Refuses options that cannot work on this corpus, whatever the model."""
    if level not in LEVELS:
        raise OptionError(f"unknown --level {level!r}; choose one of {LEVELS}")
    if not layer >= 1:
        raise OptionError(f"--layer counts from 1, got {layer}")
    if batch_seconds is not None and not batch_seconds > 0:
        raise OptionError(f"--batch-seconds must be positive, got {batch_seconds}")
    if level == "utterance":
        points, what = len(corpus), f"utterances in {corpus.path}"
    else:
        if not fit_frames >= 1:
            raise OptionError(f"--fit-frames must be at least 1, got {fit_frames}")
        points = min(fit_frames, sum(r["num_frames"] for r in corpus.records))
        what = f"frames to fit on (--fit-frames {fit_frames}, {corpus.path})"
    if clusters > points:
        raise OptionError(f"--clusters {clusters} is more than the {points} {what}; choose at most {points}")


def cluster_label_set(
    corpus: PreparedCorpus,
    name: str,
    clusters: int,
    level: str = "frame",
    model: str | None = None,
    layer: int | None = None,
    vectors: str | Path | None = None,
    allow_missing: bool = False,
    fit_frames: int = 100_000,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "float32",
    batch_seconds: float | None = None,
    num_jobs: int | None = None,
    progress: bool = True,
) -> dict:
    """What `neurostat cluster` does: k-means of given utterance ``vectors``, or of ``model``'s layer
    ``layer`` output (loaded on ``device``), attached to the corpus as label set ``name``.  The options are
    checked before the model is loaded or any feature extracted."""
    check_name(name)
    if not clusters >= 1:
        raise OptionError(f"--clusters must be at least 1, got {clusters}")
    if vectors is not None:
        if level != "utterance" or model is not None:
            raise OptionError("--vectors clusters utterances: use it with --level utterance and no --model")
        return cluster_vectors(corpus, name, vectors, clusters, seed, allow_missing)
    if model is None or layer is None:
        raise OptionError("give --model and --layer (or --vectors with --level utterance)")
    _check_feature_options(corpus, clusters, level, layer, fit_frames, batch_seconds)
    adapter = load_adapter(model, resolve_device(device), model_dtype(dtype))
    return cluster_features(
        corpus, adapter, name, layer, clusters, level, fit_frames, seed, batch_seconds, num_jobs, progress
    )
