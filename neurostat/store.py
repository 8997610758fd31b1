"""The statistics store: one Zarr v3 group that ``xarray.open_zarr`` opens as a Dataset.

Root arrays (chunked by layer): ``frames(label)`` and each collected statistic's variables, as its
declaration (:mod:`neurostat.declarations`) names them — ``topk_count``, ``positive_count`` (int64),
``mean``, ``var``, ``max_abs``, ``abs_sum`` (float64) over (``layer``, ``label``, ``neuron``), the top
frames over (``layer``, ``top``, ``neuron``); coordinates ``layer`` (1-based), ``phone``, ``gender``,
``pitch_bin`` and any attached label set (per joint label) and, with the top frames, ``utterance``.
Root attrs are one :class:`StoreMeta`: the model, the statistic parameters, the label vocabularies,
pitch edges, versions, the command line and the :class:`Progress`.

The ``neurostat`` subgroup holds what a writer needs: ``writer.lock`` (one writer at a time, an
``flock`` that dies with its process), checkpoints ``state-<n>.npz`` + ``done-<n>.json`` written
first and then published by an atomic rename of ``checkpoint.json``, and, once complete,
``utterances.json`` (the utterance ids counted, so merges can refuse overlapping shards) and
``manifest.json`` (every array file with its size and SHA-1: :func:`verify_store`).

Store format 3 puts a ``crc32c`` checksum in every chunk's codec chain (after zstd), which zarr checks on
every read: a flipped bit is an error on the read that meets it.  Format 2 stores (without it) still read.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import numpy as np

from .errors import UserError
from .files import FolderLock, atomic_write, check_out_folder, sha1_file
from .version import __version__

FORMAT = 3
READABLE = (2, 3)
"""Store formats this version reads; 2 lacks the per-chunk checksums of 3."""
_INTERNAL = "neurostat"
T = TypeVar("T")


class StoreError(UserError, RuntimeError):
    """A store that cannot be written or read as asked; the message names it."""


@dataclass
class Progress:
    """How far a run got: kept in every checkpoint and in the store's attrs; the progress of shards or
    ranks adds up (:meth:`total`).  The last three fields are set when a run ends (None: not yet)."""

    utterances_done: int = 0
    frames: int = 0
    padded_frames: int = 0
    tokens: int = 0
    audio_seconds: float = 0.0
    elapsed_seconds: float = 0.0
    data_wait_seconds: float = 0.0
    skips: dict[str, int] = field(default_factory=dict)
    loop_seconds: float | None = None
    utterances_total: int | None = None
    complete: bool | None = None

    def skip(self, reason: str) -> None:
        self.skips[reason] = self.skips.get(reason, 0) + 1

    @property
    def counted(self) -> int:
        """Utterances that contributed tokens (done minus skipped)."""
        return self.utterances_done - sum(self.skips.values())

    @classmethod
    def total(cls, parts: list[Progress]) -> Progress:
        """Shards or ranks as one run: counts, seconds, totals and skips added."""
        out = cls(utterances_total=sum(p.utterances_total or 0 for p in parts))
        for name in _SUMMED:
            setattr(out, name, sum(getattr(p, name) for p in parts))
        for p in parts:
            for reason, n in p.skips.items():
                out.skips[reason] = out.skips.get(reason, 0) + n
        return out

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


_SUMMED = (
    "utterances_done", "frames", "padded_frames", "tokens", "audio_seconds", "elapsed_seconds", "data_wait_seconds"
)  # fmt: skip


@dataclass(frozen=True)
class StoreMeta:
    """The root attrs of a store, one record: built once by the engine from its run spec, written by a
    run, a rank and a merge, read by every reader.  ``fingerprint`` is what a resumed run or a merged
    store must match; the other sections describe the run for a reader."""

    fingerprint: dict
    model: dict
    statistics: dict
    labels: dict
    label_sets: dict
    pitch: dict
    frame_labels: str
    phone_map: object
    corpus: dict
    batching: dict
    versions: dict
    command: str
    complete: bool = False
    progress: Progress | None = None
    distributed: dict | None = None
    merged_from: list[str] | None = None
    version: str = __version__
    format: int = FORMAT  # the store format it was written in (see READABLE)

    _OPTIONAL = ("progress", "distributed", "merged_from")

    def to_attrs(self) -> dict:
        out = {"neurostat_store_format": self.format, "neurostat_version": self.version}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("version", "format") or (f.name in self._OPTIONAL and value is None):
                continue
            out[f.name] = value.to_dict() if isinstance(value, Progress) else value
        return out

    @classmethod
    def from_attrs(cls, attrs: dict) -> StoreMeta:
        known = {f.name for f in fields(cls)} - {"version", "format"}
        values = {k: v for k, v in attrs.items() if k in known}
        if "progress" in values:
            values["progress"] = Progress.from_dict(values["progress"])
        missing = sorted(
            f.name for f in fields(cls) if f.name in known and f.name not in values and f.default is MISSING
        )
        if missing:
            raise StoreError(f"the store's attrs lack {', '.join(missing)}: re-collect it with this neurostat")
        return cls(
            **values, version=attrs.get("neurostat_version", "?"), format=attrs.get("neurostat_store_format", FORMAT)
        )

    @classmethod
    def read(cls, path: str | Path) -> StoreMeta:
        return cls.from_attrs(read_attrs(path))

    def replace(self, **changes) -> StoreMeta:
        return dataclasses.replace(self, **changes)

    @property
    def k(self) -> int:
        return int(self.statistics["k"])

    @property
    def stats(self) -> tuple[str, ...]:
        return tuple(self.statistics["stats"])

    @property
    def layers(self) -> list[int]:
        """The collected entries of the layer axis, 1-based."""
        return list(self.fingerprint["layers"])

    @property
    def entry_names(self) -> list[str]:
        """Each collected entry's name (``3``, ``3.ffn1``), from the model's record (a store written before the
        names had one FFN a layer: its number)."""
        names = self.model.get("entries")
        return [names[n - 1] if names else str(n) for n in self.layers]

    def for_rank(self, rank: int, size: int) -> StoreMeta:
        """The metadata of one rank's partial store."""
        part = f"rank {rank} of {size}"
        return self.replace(
            fingerprint={**self.fingerprint, "shard": part},
            corpus={**self.corpus, "shard": part},
            distributed={"world_size": size, "rank": rank, "sharding": "balanced by duration"},
        )

    def merged(self, paths: list[str | Path], progress: Progress, utterances: int, command: str) -> StoreMeta:
        """The metadata of the store that merges complete stores of the same run (this one the first);
        ``command``: the merge's own command line (the shards' commands stay in their stores)."""
        return self.replace(
            fingerprint={**self.fingerprint, "shard": "merged"},
            format=FORMAT,
            complete=False,
            progress=progress,
            merged_from=[str(Path(p).resolve()) for p in paths],
            corpus={**self.corpus, "shard": "merged", "utterances": utterances},
            command=command,
        )

    @property
    def how_to_finish(self) -> str:
        """What finishes an incomplete store: a merge is written again, a collection resumed."""
        if self.merged_from:
            return f"write the merge again: `{self.command} --overwrite`"
        return "finish it with `neurostat collect ... --resume`"


def settle_reads(timeout: float = 10.0) -> None:
    """Waits (up to ``timeout`` s) for the chunk reads zarr still runs after one of them failed, collecting
    their outcomes, so that a damaged store ends in one error and not in asyncio's "Task was destroyed but
    it is pending!" when the process exits."""
    import asyncio

    from zarr.core.sync import sync

    async def settle() -> None:
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if others:
            done, _ = await asyncio.wait(others, timeout=timeout)
            for task in done:
                if not task.cancelled():
                    task.exception()  # retrieved, so asyncio does not report it as never retrieved

    sync(settle())


def is_store(folder: Path) -> bool:
    """Whether ``folder`` is a Zarr group (a store, or another one :func:`read_attrs` then refuses by name)."""
    return (folder / "zarr.json").is_file()


def read_attrs(path: str | Path) -> dict:
    """Root attributes of a store; a folder that is not one is an error naming it."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        raise StoreError(f"{path} is not a neurostat store (no zarr.json)")
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError) as e:
        raise StoreError(f"{meta}: the store's metadata is damaged (not readable JSON: {e})") from None
    if "neurostat_store_format" not in attrs:
        raise StoreError(f"{path} is a Zarr group but not a neurostat store")
    if attrs["neurostat_store_format"] not in READABLE:
        raise StoreError(
            f"{path}: store format {attrs['neurostat_store_format']} (neurostat {attrs.get('neurostat_version')}) "
            f"is not a format this version reads ({', '.join(map(str, READABLE))}); re-collect or use a matching "
            "neurostat"
        )
    return attrs


class StoreWriter:
    """Exclusive writer of one store: checkpoints, resume and the final arrays."""

    def __init__(self, path: str | Path, meta: StoreMeta, resume: bool = False, overwrite: bool = False):
        import zarr

        self.path = Path(path)
        check_out_folder(self.path, "neurostat store", is_store)
        exists = is_store(self.path)
        if exists:
            read_attrs(self.path)
        self.internal = self.path / _INTERNAL
        self.internal.mkdir(parents=True, exist_ok=True)
        # the lock first: while another process writes, --resume is not the advice to give
        self._lock = FolderLock(
            self.internal / "writer.lock",
            lambda holder: StoreError(f"{self.path} is being written by {holder}; one writer at a time"),
        )
        if exists and not (resume or overwrite):
            self.close()
            self._check_compatible(StoreMeta.read(self.path), meta)  # --resume would be refused: say why instead
            raise StoreError(f"{self.path} already exists: pass --resume to continue it or --overwrite to replace it")
        if exists and overwrite and not resume:
            for child in self.path.iterdir():
                if child.name != _INTERNAL:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            for child in self.internal.iterdir():
                if child.name != "writer.lock":
                    child.unlink()
            exists = False
        self.previous = StoreMeta.read(self.path) if exists else None
        """The metadata of the store this run continues (None: a new store)."""
        if self.previous is not None:
            self._check_compatible(self.previous, meta)
            if self.previous.complete:
                return
        root = zarr.open_group(self.path, mode="a", zarr_format=3)
        root.attrs.update(meta.to_attrs())
        zarr.open_group(self.internal, mode="a", zarr_format=3)

    def _check_compatible(self, old: StoreMeta, new: StoreMeta) -> None:
        if old.format != new.format:
            raise StoreError(
                f"{self.path} is in store format {old.format} (neurostat {old.version}); this version writes format "
                f"{new.format} and cannot continue it: use a new --out or --overwrite"
            )
        diff = fingerprint_differences(old.fingerprint, new.fingerprint, "store has", "this run")
        if diff:
            raise StoreError(
                f"{self.path} was collected with other settings ({'; '.join(diff)}); use a new --out or --overwrite"
            )

    def update_progress(self, progress: Progress) -> None:
        """Replaces the recorded progress (of a complete store: its metadata is consolidated again)."""
        import zarr

        root = zarr.open_group(self.path, mode="a", zarr_format=3)
        root.attrs.update({"progress": progress.to_dict()})
        if root.attrs.get("complete"):
            self._consolidate()

    def _consolidate(self) -> None:
        """Consolidated metadata, so that ``xarray.open_zarr(path)`` opens the store without a warning
        (zarr warns, while writing it, that v3 has no standard for it yet: that warning is expected)."""
        import zarr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.path)

    def load_checkpoint(self) -> tuple[dict[str, np.ndarray], list[str], Progress] | None:
        """The latest published checkpoint: (state, finished utterance ids, progress), or None."""
        pointer = self.internal / "checkpoint.json"
        if not pointer.is_file():
            return None
        info = json.loads(pointer.read_text())
        with np.load(self.internal / info["state"]) as z:
            state = {k: z[k] for k in z.files}
        done = json.loads((self.internal / info["done"]).read_text())
        return state, done, Progress.from_dict(info["progress"])

    def save_checkpoint(self, state: dict[str, np.ndarray], done: list[str], progress: Progress) -> None:
        """Writes the new state and done-list, then publishes them with one atomic rename."""
        pointer = self.internal / "checkpoint.json"
        previous = json.loads(pointer.read_text()) if pointer.is_file() else None
        gen = previous["generation"] + 1 if previous else 0
        state_name, done_name = f"state-{gen}.npz", f"done-{gen}.json"
        try:
            _write_npz(self.internal / state_name, state)
            atomic_write(self.internal / done_name, json.dumps(done))
            atomic_write(
                pointer,
                json.dumps({"generation": gen, "state": state_name, "done": done_name, "progress": progress.to_dict()}),
            )
        except OSError as e:  # the new files are dropped; the previous checkpoint stays published and intact
            for partial in (state_name, done_name, done_name + ".tmp", "checkpoint.json.tmp"):
                (self.internal / partial).unlink(missing_ok=True)
            if e.errno != errno.ENOSPC:
                raise
            kept = (
                f"{Progress.from_dict(previous['progress']).utterances_done} utterances" if previous else "nothing yet"
            )
            raise StoreError(
                f"{self.path}: the disk is full ({e.strerror}); the last checkpoint ({kept}) is intact: free some "
                f"space (or copy the store elsewhere) and continue with `neurostat collect ... --resume`"
            ) from None
        for old in self.internal.iterdir():
            if old.name.startswith(("state-", "done-")) and old.name not in (state_name, done_name):
                old.unlink()

    def finalize(
        self,
        arrays: dict[str, np.ndarray],
        coords: dict[str, np.ndarray],
        meta: StoreMeta,
        done: list[str],
        keep_checkpoint: bool = False,
        dims: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        """Writes the root arrays and ``meta``, marked complete; then drops the checkpoint state (the
        arrays hold it all) unless ``keep_checkpoint``.  ``dims``: each array's dimensions [default
        (label,) for ``frames``, else (layer, label, neuron)]; coordinates ``layer`` and ``utterance``
        lie along their own dimension, ``ffn`` (each entry's name) along ``layer``, ``original_neuron`` (a
        pruned model's neurons' original indices) along (``layer``, ``neuron``), the others along ``label``."""
        import zarr

        root = zarr.open_group(self.path, mode="a", zarr_format=3)
        coord_dims = {name: _COORD_DIMS.get(name, ("label",)) for name in coords}
        for name, values in coords.items():
            along = coord_dims[name]
            dtype = str if values.dtype.kind == "U" else values.dtype
            arr = root.create_array(
                name, shape=values.shape, dtype=dtype, dimension_names=along, overwrite=True, compressors=_compressors()
            )
            arr[:] = values
        for name, values in arrays.items():
            along = (dims or {}).get(name) or (("label",) if name == "frames" else ("layer", "label", "neuron"))
            chunks = values.shape if name == "frames" else (1,) + values.shape[1:]
            arr = root.create_array(
                name,
                shape=values.shape,
                dtype=values.dtype,
                chunks=chunks,
                compressors=_compressors(),
                dimension_names=along,
                overwrite=True,
                fill_value=np.nan if values.dtype.kind == "f" else 0,
                attributes=_coordinates_attr(along, coord_dims),
            )
            arr[:] = values
        atomic_write(self.internal / "utterances.json", json.dumps(done))
        atomic_write(self.internal / "manifest.json", json.dumps(_manifest(self.path, list(coords) + list(arrays))))
        root.attrs.update(meta.replace(complete=True).to_attrs())
        self._consolidate()
        if not keep_checkpoint:
            for old in self.internal.iterdir():
                if old.name.startswith(("state-", "done-", "checkpoint.json")):
                    old.unlink()

    @property
    def lock_fd(self) -> int:
        """The descriptor that holds the writer lock (child processes should close their copy)."""
        return self._lock.fileno()

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_COORD_DIMS = {
    "layer": ("layer",),
    "utterance": ("utterance",),
    "ffn": ("layer",),
    "original_neuron": ("layer", "neuron"),
}
"""The dimensions of the coordinates that do not lie along ``label``."""


def _coordinates_attr(along: tuple[str, ...], coord_dims: dict[str, tuple[str, ...]]) -> dict:
    """An array's ``coordinates`` attribute: the non-dimension coordinates over its dimensions, which xarray
    attaches to it."""
    names = [c for c, dims in coord_dims.items() if dims != (c,) and set(dims) <= set(along)]
    return {"coordinates": " ".join(names)} if names else {}


def _compressors() -> tuple:
    """Each chunk's bytes-to-bytes codecs: zstd (zarr's default), then a CRC-32C of the compressed bytes
    that zarr checks on every read."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(level=0, checksum=False), Crc32cCodec())


def fingerprint_differences(a: dict, b: dict, a_name: str, b_name: str) -> list[str]:
    """What differs between two fingerprints, one readable item per entry; an entry holding digests (a
    dict) names each digest that differs (``corpus_content[gender labels]``), not the whole dict."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            out += [
                f"{key}[{sub}]: {a_name} {_short(x.get(sub))}, {b_name} {_short(y.get(sub))}"
                for sub in sorted(set(x) | set(y), key=str)
                if x.get(sub) != y.get(sub)
            ]
        else:
            out.append(f"{key}: {a_name} {_short(x)}, {b_name} {_short(y)}")
    return out


def _short(value) -> str:
    """A fingerprint value for a message; a hex digest cut to 12 characters."""
    if isinstance(value, str) and len(value) == 40 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    return repr(value)


def read_variable(path: str | Path, name: str, read: Callable[[], T]) -> T:
    """``read()``, the values of variable ``name``; a chunk that does not decode (its checksum differs, it
    is garbled or truncated) is a StoreError naming the variable and the chunk, not a traceback."""
    try:
        return read()
    except Exception as e:  # codec and I/O errors of a damaged chunk, whatever their type
        settle_reads()
        chunk = _damaged_chunk(path, name)
        where = f", chunk {chunk}" if chunk is not None else ""
        raise StoreError(
            f"{path}: variable {name!r} does not read back ({type(e).__name__}{where}: {e}); the store is damaged: "
            f"`neurostat info --verify` finds the file; restore it or collect again"
        ) from None


def _damaged_chunk(path: str | Path, name: str) -> str | None:
    """The first chunk of array ``name`` that does not decode (``i/j/k``), or None."""
    import itertools

    import zarr

    arr = zarr.open_array(Path(path) / name, mode="r")
    grid = [range(-(-n // c)) for n, c in zip(arr.shape, arr.chunks)]
    for block in itertools.product(*grid):
        try:
            arr.get_block_selection(block)
        except Exception:  # as in read_variable
            return "/".join(map(str, block))
    return None


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` that closes its zip on every path and syncs the file: on a full disk some numpy
    releases leave the zip open, and its later clean-up prints a traceback over the run's message."""
    with open(path, "wb") as f:
        with zipfile.ZipFile(f, "w", allowZip64=True) as z:
            for name, values in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(values), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _manifest(path: Path, arrays: list[str]) -> dict[str, list]:
    """Every file of the arrays (metadata and chunks) with its size and SHA-1."""
    return {
        f.relative_to(path).as_posix(): [f.stat().st_size, sha1_file(f)]
        for name in arrays
        for f in sorted((path / name).rglob("*"))
        if f.is_file()
    }


def verify_store(path: str | Path, checksums: bool = False) -> int:
    """Checks a complete store against the manifest written when it completed: every file present with
    its size (cheap), and with ``checksums`` its SHA-1.  A missing or damaged file is an error naming the
    variable and the chunk, never zeros.  Returns the number of files checked (0: no manifest)."""
    path = Path(path)
    manifest_file = path / _INTERNAL / "manifest.json"
    if not manifest_file.is_file():
        return 0
    for rel, (size, sha1) in json.loads(manifest_file.read_text()).items():
        f = path / rel
        var, _, chunk = rel.partition("/")
        where = f"variable {var!r}, " + (f"chunk {chunk.removeprefix('c/')}" if chunk.startswith("c/") else chunk)
        if not f.is_file():
            problem = "is missing"
        elif f.stat().st_size != size or (checksums and sha1_file(f) != sha1):
            problem = "is damaged (its size or checksum differs from when the store completed)"
        else:
            continue
        raise StoreError(f"{path}: {where} {problem}; restore the store or collect it again")
    return len(json.loads(manifest_file.read_text()))


def checkpoint_progress(path: str | Path) -> Progress | None:
    """The progress recorded with an unfinished store's latest checkpoint, or None."""
    pointer = Path(path) / _INTERNAL / "checkpoint.json"
    return Progress.from_dict(json.loads(pointer.read_text())["progress"]) if pointer.is_file() else None


def load_done(path: str | Path) -> list[str]:
    """Utterance ids counted in a complete store."""
    f = Path(path) / _INTERNAL / "utterances.json"
    return json.loads(f.read_text()) if f.is_file() else []
