"""Where ``prune`` and ``ablate`` may write a checkpoint: never over the model they read — a local folder,
the files its links point into, or a hub id's folder in the HF cache — nor over a folder that holds
anything besides a checkpoint (an ``--overwrite`` replaces the whole folder)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path

from ..files import check_out_folder, new_folder
from .checkpoints import is_checkpoint
from .provenance import FILE as PROVENANCE

CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "preprocessor_config.json",
        PROVENANCE,
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    }
)
SHARD = re.compile(r"(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)")


def is_checkpoint_file(path: Path) -> bool:
    """Whether ``path`` is one of the files a checkpoint folder consists of (what HF and neurostat write)."""
    return path.is_file() and (path.name in CHECKPOINT_FILES or bool(SHARD.fullmatch(path.name)))


def source_paths(source: str) -> list[Path]:
    """The local paths the model ``source`` occupies: a folder and the folders its linked files point into
    (a snapshot of the HF cache links into its ``blobs/``); for a hub id, its folder (snapshots, blobs,
    refs) in every HF cache it may load from (:func:`hub_caches`), downloaded or not."""
    path = Path(source)
    if path.exists():
        paths = [path]
        if path.is_dir():
            paths += sorted({f.resolve().parent for f in path.iterdir() if f.is_symlink()})
        return paths
    from huggingface_hub.file_download import repo_folder_name

    try:
        folder = repo_folder_name(repo_id=source, repo_type="model")
    except ValueError:  # not a hub id either: nothing on disk to protect
        return []
    return [Path(cache) / folder for cache in hub_caches()]


def hub_caches() -> list[str]:
    """The HF cache folders a hub id may load from: the hub client's, and the one transformers < 5 fixed
    when it was imported (``TRANSFORMERS_CACHE``), where that is another."""
    from huggingface_hub import constants
    from transformers.utils import hub

    return list(dict.fromkeys([constants.HF_HUB_CACHE, getattr(hub, "TRANSFORMERS_CACHE", constants.HF_HUB_CACHE)]))


def check_checkpoint_out(out: str | Path, model: str, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuses, before any work, an ``out`` that :func:`checkpoint_folder` would refuse."""
    inputs = (*source_paths(model), *inputs)
    return check_out_folder(out, "checkpoint", is_checkpoint, inputs, member=is_checkpoint_file)


def checkpoint_folder(
    out: str | Path, model: str, inputs: Iterable[str | Path | None] = (), overwrite: bool = False
) -> AbstractContextManager[Path]:
    """A temporary folder to write the checkpoint into, put in ``out``'s place at the end
    (:func:`neurostat.files.new_folder`), clear of the model ``model`` and the other ``inputs``."""
    inputs = (*source_paths(model), *inputs)
    return new_folder(out, "checkpoint", is_checkpoint, inputs, overwrite, is_checkpoint_file)
