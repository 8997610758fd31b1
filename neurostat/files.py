"""Writing files and folders all-or-nothing (prepared corpora, label sets, stores, checkpoints), and the one
writer of a folder."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
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


class FolderLock:
    """The one writer of a folder (a store, a prepared corpus): an ``flock`` on the file ``path`` (the kernel
    releases it when its process ends, however it ends) whose text names the holder, ``pid N on HOST``.  A
    second writer gets ``refuse(holder)`` raised.  Text left in a file no one locks names a writer that died:
    :attr:`taken_over`.  The file stays after :meth:`release` (deleting it would let a process that opened it
    before lock a file no one else sees)."""

    def __init__(self, path: Path, refuse: Callable[[str], Exception]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise refuse(holder) from None
        self._file.seek(0)
        self.taken_over: str | None = self._file.read().strip() or None
        """The holder named in a lock whose process died (None: the lock was free)."""
        self._write(f"pid {os.getpid()} on {os.uname().nodename}")

    def _write(self, text: str) -> None:
        self._file.seek(0)
        self._file.truncate()
        self._file.write(text)
        self._file.flush()

    def fileno(self) -> int:
        """The descriptor that holds the lock (a forked worker closes its copy, so that the lock dies with
        this process)."""
        return self._file.fileno()

    def release(self) -> None:
        """Empties the file (a free lock), unlocks and closes it; again is a no-op."""
        if not self._file.closed:
            try:
                self._write("")
            finally:
                fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def sha1_file(path: Path) -> str:
    """The SHA-1 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_root() -> Path:
    """neurostat's own cache folder (``$NEUROSTAT_CACHE``, default ``~/.cache/neurostat``): the demo's corpus
    and store, digests of model weights — what neurostat keeps for itself, never in the user's folders.
    A file in its place is a ``NotADirectoryError`` naming the variable (what writes the cache reports it;
    what only reads it goes on without)."""
    root = Path(os.environ.get("NEUROSTAT_CACHE", Path.home() / ".cache" / "neurostat"))
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "neurostat's cache (NEUROSTAT_CACHE) is a file, not a folder", str(root))
    return root


def _relation(out: Path, path: Path) -> str | None:
    """How the folder ``out`` and an input ``path`` (both resolved) overlap: None when they do not."""
    if out == path:
        return "is"
    if out in path.parents:
        return "contains"
    if path in out.parents:
        return "lies inside"
    return None


def has_page(folder: Path, marker: str) -> bool:
    """Whether ``folder``'s ``index.html`` holds ``marker`` (how a report or a browser knows its own output)."""
    try:
        return marker in (folder / "index.html").read_text(errors="replace")
    except OSError:
        return False


def check_out_folder(
    out: str | Path,
    kind: str,
    is_kind: Callable[[Path], bool],
    inputs: Iterable[str | Path | None] = (),
    option: str = "--out",
    member: Callable[[Path], bool] | None = None,
) -> Path:
    """The one rule for every folder a command writes: ``out`` may be missing, empty or a ``kind`` folder
    (``is_kind``: the command's own output, which it may replace or update), never a file, any other
    folder, nor one that is, contains or lies inside one of the command's ``inputs`` (local paths; others
    are skipped).  With ``member`` (which entries a ``kind`` folder consists of), a ``kind`` folder that
    also holds anything else is refused too, naming it: replacing the folder would delete it.  Refusals
    are :class:`UserError`s naming the folder and why; returns ``out`` absolute."""
    out = Path(out).absolute()
    where = out.resolve()
    existing = next(p for p in (where, *where.parents) if p.exists())
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {out}: cannot write in {existing} (read-only or not yours); choose another place")
    for source in inputs:
        if source is None or not Path(source).exists():
            continue
        relation = _relation(where, Path(source).resolve())
        if relation:
            raise UserError(
                f"{option} {out} {relation} the input {source}: writing the {kind} there could destroy it; "
                "choose a folder outside it"
            )
    if out.exists() and not out.is_dir():
        raise UserError(f"{option} {out} is a file, not a folder; give a new or empty folder for the {kind}")
    if out.is_dir() and any(out.iterdir()) and not is_kind(out):
        first = sorted(child.name for child in out.iterdir())[0]
        raise UserError(
            f"{option} {out} is a folder that holds other files (e.g. {first}) and is not a {kind}; neurostat "
            f"writes only into a new or empty folder or over its own {kind}: choose another --out"
        )
    foreign = sorted(child.name for child in out.iterdir() if not member(child)) if member and out.is_dir() else []
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(
            f"{option} {out} holds {foreign[0]}{more} beside a {kind}; neurostat replaces a {kind} folder only "
            f"when it holds nothing else: move {'them' if more else 'it'} away or choose another {option}"
        )
    return out


@contextmanager
def new_folder(
    out: str | Path,
    kind: str,
    is_kind: Callable[[Path], bool],
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool = False,
    member: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """A temporary sibling of ``out`` to write into, renamed to ``out`` when the block ends without an
    error (removed when it fails).  ``out`` must pass :func:`check_out_folder`; an existing, non-empty
    one is replaced only with ``overwrite``."""
    out = check_out_folder(out, kind, is_kind, inputs, member=member)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it")
    target = out.resolve() if out.is_symlink() else out  # a link to a folder: the folder is replaced, the link kept
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        yield tmp
        mode = _default_file_mode()
        for path in tmp.rglob("*"):  # some writers (safetensors) create their files 0600
            if path.is_file():
                path.chmod(mode)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    """Puts the folder ``new`` where ``target`` is: the old one moves aside first and is deleted only once
    the new one stands in its place (put back if that fails)."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old)


def _default_file_mode() -> int:
    """The mode a new file gets from the process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
