"""Writing files and folders all-or-nothing (prepared corpora, label sets, stores, checkpoints)."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def atomic_write(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a synced temporary file and one rename: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha1_file(path: Path) -> str:
    """The SHA-1 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def new_folder(out: str | Path, source: str | Path | None = None, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` when the block ends without an
    error (removed when it fails).  An existing ``out`` is refused unless ``overwrite``; the ``source``
    folder (the checkpoint being edited) is refused always."""
    out = Path(out).absolute()
    if source is not None and Path(source).exists() and out.resolve() == Path(source).resolve():
        raise UserError(
            f"--out {out} is the source model itself: writing there would destroy it; choose another folder"
        )
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)
