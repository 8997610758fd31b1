"""Checkpoint folders: where a model source is (``demo``: the shipped model), which folders are checkpoints,
the digest of their weights, and which are neurostat's pruned checkpoints (HF config + ``neurostat.json``
with each layer-axis entry's kept neurons + ``model.safetensors``; HF cannot load them because pruned FFNs
have other widths: :func:`~neurostat.model.loading.load_pruned` does)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..files import atomic_write, cache_root, sha1_file
from .families import ModelError
from .provenance import FILE as PROVENANCE
from .provenance import EditRecord

DEMO = "demo"
"""The name that stands for the demo model neurostat ships, wherever a model source is taken."""
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "tiny" / "model"
"""The shipped demo model's folder (package data; :mod:`neurostat.tiny` trains and writes it)."""


class PruneError(ValueError):
    """A budget or protected set that cannot be met, or a checkpoint that cannot be read."""


def model_source(source: str) -> str:
    """``source`` as transformers takes it: ``demo`` becomes the shipped demo model's folder."""
    if source != DEMO:
        return source
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise ModelError(f"{DEMO_MODEL_DIR}: the demo model is missing from this installation; reinstall neurostat")
    return str(DEMO_MODEL_DIR)


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` holds a model checkpoint (a ``config.json`` that names a model type, or what is
    left of a neurostat one: its ``neurostat.json``) — the only kind of folder ``prune``/``ablate
    --overwrite`` replace."""
    if (folder / PROVENANCE).is_file():
        return True
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def weights_digest_file(folder: Path) -> Path:
    """Where the weight digest of the model folder ``folder`` is cached: in neurostat's cache, one file per
    folder (named by its resolved path), never inside the model's folder (read-only installs, shared models)."""
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    return cache_root() / "weights" / f"{key}.json"


def weights_fingerprint(source: str, fresh: bool = False) -> str | None:
    """SHA-1 over a local model folder's weight files (``*.safetensors``, ``*.bin``), cached by name, size and
    mtime in :func:`weights_digest_file`; None for a hub id (its revision names it).  The cache serves
    display only: ``fresh`` hashes the content whatever it says (what a run decides on, as weights edited
    in place can keep their size and mtime)."""
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin"))
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    try:
        cached = json.loads(weights_digest_file(folder).read_text())
        if not fresh and cached["files"] == stamp:
            return cached["sha1"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha1("".join(f"{f.name}:{sha1_file(f)};" for f in files).encode()).hexdigest()
    try:
        cache = weights_digest_file(folder)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, json.dumps({"files": stamp, "sha1": digest}))
    except OSError:  # an unwritable cache: hash again next time
        pass
    return digest


def save_feature_extractor(source: str, out: str | Path) -> bool:
    """Copies a checkpoint's feature-extractor config into ``out``; False when it has none."""
    from transformers import AutoFeatureExtractor

    try:
        AutoFeatureExtractor.from_pretrained(model_source(source)).save_pretrained(out)
    except (OSError, ValueError):
        return False
    return True


def pruned_record(source: str) -> EditRecord | None:
    """The record of a neurostat pruned checkpoint at ``source``; None for anything else."""
    record = EditRecord.read(source) if Path(source).is_dir() else None
    return record if record is not None and record.edit == "pruned" else None
