"""The prepared-corpus folder: :class:`PreparedCorpus` is its only reader and writer.

Layout (written by ``neurostat prepare`` and by attaching label sets):

- ``meta.json`` – vocabularies, phone mapping, frame geometry, pitch method and bin edges,
  settings, counts, skips by reason, the attached label sets and the content digests
  (:meth:`PreparedCorpus.content_digests`);
- ``manifest.jsonl`` – one line per usable utterance (id, speaker, gender, audio path and its SHA-1,
  lengths);
- ``skips.jsonl`` – one line per skipped utterance (id, reason, file, message);
- ``frames.npy`` – every utterance's frames (in manifest order), one row per model frame: phone index
  (by the corpus's frame labelling), pitch-bin index and F0 (:class:`FrameLabels`, memory-mapped by
  the data-loading workers);
- ``intervals.npy`` – every utterance's phone intervals (start s, end s, phone index), and
  ``index.npy`` – each utterance's id, first frame and first interval in those two, and their counts;
- ``utts/<id>.utt`` – prepare's cache: one utterance's intervals and F0 with the key of their inputs
  (a later prepare reuses the file when the key matches; :func:`write_utterance_file`; an earlier
  neurostat's ``<id>.npz`` is read too); nothing else reads it;
- ``prepare.lock`` – the one writer's lock (:class:`PrepareLock`), empty when no prepare is writing;
- ``labels/<name>-<hash>.npz`` + ``.values.npy`` – label sets, named by their content, and
  ``labels/<name>.centroids.npy`` for k-means sets.

>>> corpus = PreparedCorpus("prepared/")
>>> for utt in corpus:
...     utt.id, utt.gender, utt.phone_frames(), utt.f0, utt.pitch_bins(), utt.part_labels("gender")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..files import FolderLock, atomic_write, sha1_file
from ..frames import FrameGeometry, default_geometry, label_frames, label_frames_overlap
from ..version import __version__
from .audio import Skip
from .pitch import assign_bins
from .source import AudioRef
from .timit import MAP_SOURCE

FORMAT = 3
"""Format of the prepared folder: 3 keeps the frame labels of all utterances in one memory-mapped array."""
CACHE_FORMAT = 2
"""Format of the arrays prepare caches per utterance (``utts/``), part of their key.  The file holding them is
``<id>.utt`` (:func:`write_utterance_file`); an earlier neurostat's ``<id>.npz`` (a zip of the same arrays) is
still read, so an upgrade keeps the cache."""
BASE_PARTS = ("phone", "gender", "pitch_bin")


class PreparedCorpusError(ValueError):
    """A prepared-corpus folder that is missing, unfinished or of another format."""


@dataclass(frozen=True)
class PitchMeta:
    """How a prepared corpus binned F0: the method, the bin edges (Hz) and names, and the rule."""

    method: str
    edges: list[float]
    bins: list[str]
    quantiles: list[float] | None
    rule: str
    step_seconds: float | None = None  # the F0 analysis step (None: labels taken as given)
    align: str = "time"  # F0 read at the frame centres, or (paper) the track left-padded to the labels

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k == "step_seconds" and v is None)}


@dataclass(frozen=True)
class PreparedMeta:
    """``meta.json`` of a prepared corpus, one record: written by ``prepare`` and by the paper-label
    import alike, read through :attr:`PreparedCorpus.meta`."""

    corpus: str  # the layout it was read in (one of neurostat.choices.LAYOUTS)
    root: str
    subset: str | None  # None: the layout's whole corpus (TIMIT without --subset, a manifest)
    alignments: str | None
    geometry: dict
    phones: list[str]
    genders: list[str]
    phone_map: object
    pitch: PitchMeta
    frame_labels: str
    strict: bool
    num_utterances: int
    num_frames: int
    hours: float
    resampled: int
    skips: dict[str, int]
    paper_labels: str | None = None  # the official label folder the labels came from
    label_sets: dict = field(default_factory=dict)
    digests: dict[str, str | None] | None = None  # content digests (see _content_digests); None: not recorded
    files: dict[str, str] | None = None  # SHA-1 of each file collect reads (PreparedCorpus.verify); None: not recorded
    source_options: dict = field(default_factory=dict)  # the layout's own options (TIMIT: {"sa": False})
    lacking: dict[str, str] = field(default_factory=dict)  # what the corpus does not give: {"gender": "why"}
    version: str = __version__

    _OPTIONAL = ("paper_labels", "digests", "files", "source_options", "lacking")  # left out of meta.json when empty

    def to_dict(self) -> dict:
        out = {"neurostat_version": self.version, "format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "version" or (f.name in self._OPTIONAL and not value):
                continue
            out[f.name] = value.to_dict() if isinstance(value, PitchMeta) else value
        return out

    @classmethod
    def from_dict(cls, d: dict, where: Path) -> PreparedMeta:
        if d.get("format") != FORMAT:
            folder = where.parent if where.name == "meta.json" else where
            raise PreparedCorpusError(
                f"{where}: prepared-corpus format {d.get('format')} is not {FORMAT} (format 3 keeps the frame labels "
                f"of all utterances in one memory-mapped file); re-run neurostat prepare into the same folder, "
                f"which reuses its cached utterances: {prepare_command(d, folder)}"
            )
        names = {f.name for f in fields(cls)} - {"version"}
        try:
            values = {k: v for k, v in d.items() if k in names}
            return cls(**{**values, "pitch": PitchMeta(**d["pitch"])}, version=d.get("neurostat_version", "?"))
        except (KeyError, TypeError) as e:
            raise PreparedCorpusError(f"{where}: meta.json is incomplete ({e}); re-run prepare") from None

    def replace(self, **changes) -> PreparedMeta:
        return dataclasses.replace(self, **changes)


_DEFAULT_GEOMETRY = default_geometry().to_dict()


def prepare_command(d: dict, folder: Path) -> str:
    """The ``neurostat prepare`` command that writes ``folder`` again from its ``meta.json`` ``d`` (of any
    format): the corpus, and the labelling options it records.  ``MODEL`` and ``PHONE_MAP`` stand for
    what the folder does not record (the model of a non-default frame geometry, the phone-map file)."""
    args = ["neurostat", "prepare"] + (
        ["--corpus", d["corpus"]] if d.get("corpus", "librispeech") != "librispeech" else []
    )
    librispeech = d.get("corpus", "librispeech") == "librispeech"
    args += ["--root", str(d.get("root", "ROOT"))]
    if d.get("subset") or librispeech:
        args += ["--subset", str(d.get("subset") or "SUBSET")]
    args += ["--no-sa"] if d.get("source_options", {}).get("sa") is False else []
    if d.get("paper_labels"):
        args += ["--paper-labels", d["paper_labels"]]
    else:
        if d.get("alignments") or librispeech:
            args += ["--alignments", str(d.get("alignments") or "ALIGNMENTS")]
        args += _labelling_options(d)
    if d.get("geometry", _DEFAULT_GEOMETRY) != _DEFAULT_GEOMETRY:
        args += ["--model", "MODEL"]
    return shlex.join([*args, "--out", str(folder)])


def _labelling_options(d: dict) -> list[str]:
    """The command-line options of the labelling that a prepared corpus's ``meta.json`` records."""
    pitch, geometry = d.get("pitch", {}), FrameGeometry.from_dict(d.get("geometry", _DEFAULT_GEOMETRY))
    out = []
    for option, value, default in (
        ("--pitch", pitch.get("method"), "praat"),
        ("--frame-labels", d.get("frame_labels"), "centre"),
        ("--pitch-rule", pitch.get("rule"), "interval"),
        ("--pitch-align", pitch.get("align"), "time"),
    ):
        if value not in (None, default):
            out += [option, value]
    quantiles = pitch.get("quantiles")
    if quantiles is None and pitch.get("edges"):
        out += ["--pitch-edges", ",".join(repr(float(e)) for e in pitch["edges"])]
    elif quantiles and any(abs(q - (i + 1) / (len(quantiles) + 1)) > 1e-9 for i, q in enumerate(quantiles)):
        out += ["--pitch-percentiles", ",".join(f"{100 * q:g}" for q in quantiles)]
    elif quantiles is not None and len(quantiles) != 2:
        out += ["--pitch-bins", str(len(quantiles) + 1)]
    step = pitch.get("step_seconds")
    if step is not None and abs(step - geometry.stride / geometry.sample_rate / 2) > 1e-12:
        out += ["--pitch-step-ms", f"{1000 * step:g}"]
    phone_map = d.get("phone_map", {"source": "arpabet-stress-merge", "extra": {}})
    timit = isinstance(phone_map, dict) and phone_map.get("source") == MAP_SOURCE
    if phone_map != {"source": "arpabet-stress-merge", "extra": {}} and not timit:
        out += ["--phone-map", "PHONE_MAP"]
    return out + (["--strict"] if d.get("strict") else [])


class AudioChangedError(PreparedCorpusError):
    """An utterance's audio file whose content differs from the file prepare labelled."""


class LabelSetError(ValueError):
    """A label file or label set that cannot be used; the message names the file and the problem."""


@dataclass
class LabelSet:
    """A label set read back from its files: labels of one utterance by id."""

    name: str
    path: Path
    level: str
    vocab: tuple[str, ...]

    @cached_property
    def _arrays(self) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        if not self.path.is_file():
            raise LabelSetError(f"{self.path}: the file of label set {self.name!r} is missing; attach it again")
        with np.load(self.path) as z:
            ids, offsets = z["ids"], z["offsets"]
        values = np.load(self.path.with_suffix(".values.npy"), mmap_mode="r")
        return {str(u): i for i, u in enumerate(ids)}, offsets, values

    def __contains__(self, utt: str) -> bool:
        return utt in self._arrays[0]

    def lengths(self) -> dict[str, int]:
        position, offsets, _ = self._arrays
        return {u: int(offsets[i + 1] - offsets[i]) for u, i in position.items()}

    def labels(self, utt: str) -> np.ndarray:
        """Label indices of the utterance (one per frame, or one); KeyError if it has none."""
        position, offsets, values = self._arrays
        i = position[utt]
        return values[offsets[i] : offsets[i + 1]].astype(np.int64)


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` is a prepared corpus, finished (``meta.json``) or interrupted (``utts/``, a lock, or
    the ``meta.json`` of a run stopped while it wrote the final files): the only kind of non-empty folder
    ``prepare`` writes into (it reuses what is cached there)."""
    return any((folder / name).exists() for name in ("meta.json", "utts", LOCK, PREVIOUS_META))


LOCK = "prepare.lock"
PREVIOUS_META = "meta.previous.json"
"""``meta.json`` moved aside while ``create`` writes the final files: a folder stopped there has no ``meta.json``
(unfinished, never a mix of two runs' files), and the next run takes its label sets from here."""


class PrepareLockedError(PreparedCorpusError):
    """Another process is writing the prepared folder."""


class PrepareLock(FolderLock):
    """The one writer of a prepared folder, as a store has one: a :class:`~neurostat.files.FolderLock` on
    ``<folder>/prepare.lock``; a second writer is refused naming the holder, a dead writer's lock taken over."""

    def __init__(self, folder: str | Path):
        def refuse(holder: str) -> PrepareLockedError:
            return PrepareLockedError(
                f"{Path(folder)} is being prepared by {holder}; one writer at a time: wait for it to finish "
                "(or stop it), then run prepare again — it reuses what that run labelled"
            )

        super().__init__(Path(folder) / LOCK, refuse)


def _utterance_file(folder: Path, utt_id: str) -> Path:
    """``utts/<id>.utt``, the id quoted so that any id is one file name in ``utts/``."""
    return Path(folder) / "utts" / f"{quote(utt_id, safe='')}.utt"


def _earlier_utterance_file(folder: Path, utt_id: str) -> Path:
    """Where neurostat before 2026-12-06 kept an utterance's cache: ``utts/<id>.npz`` (still read)."""
    return Path(folder) / "utts" / f"{utt_id}.npz"


_HEADER_LENGTH = 8  # bytes, little-endian: the length of the JSON header that follows
_EARLIER_ARRAYS = ("starts", "ends", "phone", "f0", "pitch_bins")


def write_utterance_file(path: Path, key: str, record: dict, arrays: dict[str, np.ndarray]) -> None:
    """Writes one utterance's cache file in one write and one rename: its header's length, a JSON header
    (the key of its inputs, its record, and each array's dtype, shape and offset), then the arrays' bytes.
    The temporary file is this process's own (a writer left over from a killed run cannot mix into it)."""
    layout, offset, parts = {}, 0, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        layout[name] = [array.dtype.str, list(array.shape), offset]
        offset += array.nbytes
        parts.append(array.tobytes())
    header = json.dumps({"key": key, "record": record, "arrays": layout}).encode()
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(_HEADER_LENGTH, "little") + header + b"".join(parts))
    os.replace(tmp, path)


def read_utterance_file(path: Path) -> tuple[str, dict, dict[str, np.ndarray]]:
    """The key, record and arrays of a cache file :func:`write_utterance_file` wrote; ValueError if it is not
    one (cut short, edited, or another file), OSError if it cannot be read."""
    data = Path(path).read_bytes()
    try:
        size = int.from_bytes(data[:_HEADER_LENGTH], "little")
        header = json.loads(data[_HEADER_LENGTH : _HEADER_LENGTH + size])
        key, record, layout = header["key"], header["record"], header["arrays"]
        if not (isinstance(key, str) and isinstance(record, dict) and isinstance(layout, dict)):
            raise ValueError("a header without its key, record and arrays")
        start, packed, arrays = _HEADER_LENGTH + size, 0, {}
        for name, (dtype, shape, offset) in layout.items():  # packed one after another, as written
            dtype = np.dtype(dtype)
            if offset != packed or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ValueError(f"array {name!r}: offset {offset}, shape {shape}")
            count = int(np.prod(shape, dtype=np.int64))
            arrays[name] = np.frombuffer(data, dtype, count, start + offset).reshape(shape)
            packed += count * dtype.itemsize
        end = start + packed
    except (KeyError, TypeError, AttributeError, OverflowError, UnicodeDecodeError) as e:
        raise ValueError(f"not a cache file ({type(e).__name__}: {e})") from None
    if end != len(data):
        raise ValueError(f"{len(data)} bytes where the header describes {end}")
    return key, record, arrays


def read_cached_utterance(folder: Path, utt_id: str) -> tuple[str, dict, dict[str, np.ndarray]]:
    """The key, record and arrays of an utterance's cache file: ``<id>.utt``, else an earlier neurostat's
    ``<id>.npz`` (a prepare after an upgrade reuses it); FileNotFoundError where neither is."""
    try:
        return read_utterance_file(_utterance_file(folder, utt_id))
    except FileNotFoundError:
        pass
    try:
        with np.load(_earlier_utterance_file(folder, utt_id)) as z:
            arrays = {k: z[k] for k in _EARLIER_ARRAYS if k in z.files}
            return str(z["key"]), json.loads(str(z["record"])), arrays
    except (KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"not a cache file ({type(e).__name__}: {e})") from None


FRAME_FIELDS = np.dtype([("phone", "<i2"), ("pitch_bin", "<i2"), ("f0", "<f4")])
INTERVAL_FIELDS = np.dtype([("start", "<f8"), ("end", "<f8"), ("phone", "<i2")])
LABEL_FILES = ("frames.npy", "intervals.npy", "index.npy")
MANIFEST = "manifest.jsonl"


def phone_frames(
    starts: np.ndarray, ends: np.ndarray, phone: np.ndarray, frame_labels: str, geo: FrameGeometry, n: int
) -> np.ndarray:
    """Phone index of each of ``n`` frames by the ``frame_labels`` rule (the interval containing the frame
    centre, or the one of largest overlap with its stride cell), −1 where there is none."""
    if frame_labels == "overlap":
        return label_frames_overlap(starts, ends, phone, geo.stride / geo.sample_rate, n)
    return label_frames(starts, ends, phone, geo.centres(n))


def _index_fields(ids: list[str]) -> np.dtype:
    width = max((len(u) for u in ids), default=1)
    return np.dtype(
        [("id", f"<U{width}"), ("frame", "<i8"), ("frames", "<i8"), ("interval", "<i8"), ("intervals", "<i8")]
    )


@dataclass(frozen=True)
class FrameLabels:
    """``frames.npy``, ``intervals.npy`` and ``index.npy``: the labels of every utterance concatenated (in
    manifest order when written), one memory-mapped array each, so that a data-loading worker reads an
    utterance's labels as a slice instead of opening a file per utterance."""

    frames: np.ndarray  # FRAME_FIELDS: phone, pitch-bin index and F0 (Hz, NaN unvoiced) of every model frame
    intervals: np.ndarray  # INTERVAL_FIELDS: start s, end s, phone index of every aligned interval
    index: np.ndarray  # one row per utterance: id, first frame and frame count, first interval and count
    rows: dict[str, int]  # utterance id -> its row of ``index`` (not on disk: built when read)

    def utterance(self, utt_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(frames, intervals) of an utterance: views, nothing read yet."""
        _, f, nf, i, ni = self.index[self.rows[utt_id]].tolist()
        return self.frames[f : f + nf], self.intervals[i : i + ni]

    @classmethod
    def read(cls, folder: Path, records: list[dict]) -> FrameLabels:
        """The files memory-mapped (plain views: slicing a np.memmap costs a Python call per slice), checked
        to hold every utterance of the manifest."""
        try:
            frames, intervals = (np.load(folder / n, mmap_mode="r").view(np.ndarray) for n in LABEL_FILES[:2])
            index = np.load(folder / LABEL_FILES[2])
        except (OSError, ValueError) as e:
            raise PreparedCorpusError(
                f"{folder}: cannot read its frame labels ({e}); re-run neurostat prepare"
            ) from None
        ok = frames.dtype == FRAME_FIELDS and intervals.dtype == INTERVAL_FIELDS and index.dtype.names is not None
        ok = ok and index.dtype.names == _index_fields([]).names
        labels = cls(frames, intervals, index, {str(u): r for r, u in enumerate(index["id"])} if ok else {})
        missing = [r["id"] for r in records if r["id"] not in labels.rows]
        if not ok or missing or (len(index) and index["frame"][-1] + index["frames"][-1] != len(frames)):
            raise PreparedCorpusError(
                f"{folder}: its frame labels do not match its manifest"
                + (f" (no labels for {len(missing)} utterances, first: {missing[0]})" if missing else "")
                + "; re-run neurostat prepare"
            )
        return labels

    @staticmethod
    def write(folder: Path, meta: PreparedMeta, records: list[dict], cached: Iterable[dict]) -> dict[str, str]:
        """Writes the files from each record's cached arrays (``cached``, in record order): phones labelled
        by the corpus's rule, pitch bins by its edges and rule (or as given), frames straight into the
        memory-mapped file; each file in one rename.  Returns each file's SHA-1."""
        geo = FrameGeometry.from_dict(meta.geometry)
        index = np.zeros(len(records), dtype=_index_fields([r["id"] for r in records]))
        index["id"], index["frames"] = [r["id"] for r in records], [r["num_frames"] for r in records]
        index["frame"] = np.cumsum(index["frames"]) - index["frames"]
        tmp = {name: folder / name.replace(".npy", ".tmp.npy") for name in LABEL_FILES}
        frames = np.lib.format.open_memmap(tmp["frames.npy"], "w+", FRAME_FIELDS, (int(index["frames"].sum()),))
        intervals = []
        for (_, first, n, _, _), a in zip(index.tolist(), cached, strict=True):
            rows = frames[first : first + n]
            rows["phone"] = phone_frames(a["starts"], a["ends"], a["phone"], meta.frame_labels, geo, n)
            f0 = a["f0"].astype(np.float64)
            rows["pitch_bin"] = (
                a["pitch_bins"] if "pitch_bins" in a else assign_bins(f0, meta.pitch.edges, meta.pitch.rule)
            )
            rows["f0"] = a["f0"]
            interval = np.empty(len(a["starts"]), INTERVAL_FIELDS)
            interval["start"], interval["end"], interval["phone"] = a["starts"], a["ends"], a["phone"]
            intervals.append(interval)
        index["intervals"] = [len(x) for x in intervals]
        index["interval"] = np.cumsum(index["intervals"]) - index["intervals"]
        frames.flush()
        del frames
        np.save(tmp["intervals.npy"], np.concatenate(intervals) if intervals else np.empty(0, INTERVAL_FIELDS))
        np.save(tmp["index.npy"], index)
        digests = {name: sha1_file(path) for name, path in tmp.items()}
        for name, path in tmp.items():
            os.replace(path, folder / name)
        return digests


@dataclass
class PreparedUtterance:
    """One labelled utterance: speaker, gender, phone intervals and F0 per frame centre."""

    corpus: "PreparedCorpus"
    record: dict

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def speaker(self) -> str:
        return self.record["speaker"]

    @property
    def gender(self) -> str:
        return self.record["gender"]

    @property
    def audio_path(self) -> Path:
        return Path(self.record["audio"])

    @property
    def num_frames(self) -> int:
        return self.record["num_frames"]

    @cached_property
    def _labels(self) -> tuple[np.ndarray, np.ndarray]:
        frames, intervals = self.corpus.frame_labels.utterance(self.id)
        if len(frames) != self.num_frames:
            raise PreparedCorpusError(
                f"{self.corpus.path}: utterance {self.id} has {len(frames)} frame labels but {self.num_frames} frames "
                "in its manifest; re-run neurostat prepare"
            )
        return frames, intervals

    @property
    def frames(self) -> np.ndarray:
        """Its rows of ``frames.npy`` (fields ``phone``, ``pitch_bin``, ``f0``): a read-only view of the map."""
        return self._labels[0]

    @property
    def intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start s, end s, phone index into ``corpus.phones``) of each aligned interval."""
        iv = self._labels[1]
        return np.array(iv["start"]), np.array(iv["end"]), np.array(iv["phone"])

    @property
    def f0(self) -> np.ndarray:
        """F0 in Hz at each frame centre of the prepared geometry (NaN = unvoiced)."""
        return np.array(self._labels[0]["f0"])

    def phone_frames(self, geometry: FrameGeometry | None = None) -> np.ndarray:
        """Phone index of each frame by the corpus's frame labelling (the interval containing the frame
        centre, or the one of largest overlap with its stride cell), −1 where there is none; for another
        ``geometry`` labelled from the intervals."""
        if geometry is None or geometry == self.corpus.geometry:
            return self._labels[0]["phone"].astype(np.int64)
        n = geometry.num_frames(self.record["num_samples"])
        return phone_frames(*self.intervals, self.corpus.meta.frame_labels, geometry, n)

    def pitch_bins(self) -> np.ndarray:
        """Pitch-bin index of each frame by the corpus's bin rule (the last bin is ``unvoiced``), or the
        bins the corpus was given (official label files)."""
        return self._labels[0]["pitch_bin"].astype(np.int64)

    def part_labels(self, part: str) -> int | np.ndarray:
        """Index of ``part``'s label: one per frame (phone, pitch bin, frame-level sets) or one for the
        utterance (gender, utterance-level sets).  An utterance missing from a label set is a Skip."""
        if part == "phone":
            return self.phone_frames()
        if part == "pitch_bin":
            return self.pitch_bins()
        if part == "gender":
            return self.corpus.vocabularies["gender"].index(self.gender)
        labels = self.corpus.label_set(part)
        if self.id not in labels:
            raise Skip(f"no-{part}-label", labels.path, f"utterance {self.id} has no {part!r} label")
        values = labels.labels(self.id)
        return int(values[0]) if labels.level == "utterance" else values

    def load_audio(self, out: np.ndarray | None = None) -> np.ndarray:
        """The waveform at the prepared geometry's sample rate (float32, mono; decoded into ``out`` when it
        has exactly as many samples, see :func:`~neurostat.corpus.audio.load_audio`): the file, its span or the
        Lhotse recording's span prepare read.  Audio whose content is not what prepare read (its SHA-1, recorded
        at prepare) is an :class:`AudioChangedError` naming it."""
        sample_rate, strict = self.corpus.geometry.sample_rate, self.corpus.meta.strict
        wave, _, digest = AudioRef.from_record(self.record).load(sample_rate, strict=strict, out=out)
        recorded = self.record.get("audio_sha1")
        if recorded is not None and digest != recorded:
            raise AudioChangedError(
                f"{self.audio_path}: the audio of utterance {self.id} changed after prepare (SHA-1 {digest[:12]}, "
                f"prepared from {recorded[:12]}): restore the file, or run prepare again and collect anew"
            )
        return wave


class PreparedCorpus:
    """A folder written by ``neurostat prepare``; iterates :class:`PreparedUtterance`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            if is_prepared(self.path):
                raise PreparedCorpusError(
                    f"{self.path} is an unfinished prepared corpus (no meta.json: a prepare stopped or is still "
                    "writing it); run neurostat prepare into it again, which reuses the utterances it labelled"
                )
            raise PreparedCorpusError(
                f"{self.path} is not a prepared corpus (no meta.json); run `neurostat prepare` first"
            )
        self.reload()

    def reload(self) -> None:
        """Reads meta.json and the manifest again (after a label set was attached or removed)."""
        meta_path = self.path / "meta.json"
        self.meta = PreparedMeta.from_dict(_read_json(meta_path), meta_path)
        lines = (self.path / MANIFEST).read_text().splitlines()
        try:
            self.records = [json.loads(line) for line in lines if line.strip()]
        except ValueError as e:
            raise PreparedCorpusError(f"{self.path / MANIFEST}: not JSON lines ({e}); re-run neurostat prepare") from None
        self.geometry = FrameGeometry.from_dict(self.meta.geometry)
        self.edges = list(self.meta.pitch.edges)
        self.phones = tuple(self.meta.phones)
        self.label_sets: dict[str, dict] = dict(self.meta.label_sets)
        self.vocabularies: dict[str, tuple[str, ...]] = {
            "phone": self.phones,
            "gender": tuple(self.meta.genders),
            "pitch_bin": tuple(self.meta.pitch.bins),
            **{name: tuple(entry["vocab"]) for name, entry in self.label_sets.items()},
        }
        """Each label part's vocabulary (phone, gender, pitch bin, attached label sets), in part order."""
        self._sets: dict[str, LabelSet] = {}
        self._digests: dict[str, str | None] | None = None
        self._frame_labels: FrameLabels | None = FrameLabels.read(self.path, self.records)

    @property
    def frame_labels(self) -> FrameLabels:
        """Every utterance's frame labels, memory-mapped (again in a process this corpus was pickled to)."""
        if self._frame_labels is None:
            self._frame_labels = FrameLabels.read(self.path, self.records)
        return self._frame_labels

    def __getstate__(self) -> dict:
        """Pickled without its memory maps (a spawned worker maps the files again)."""
        return {**self.__dict__, "_sets": {}, "_frame_labels": None}

    def label_set(self, name: str) -> LabelSet:
        """An attached label set (see :mod:`neurostat.corpus.labelsets`)."""
        if name not in self.label_sets:
            raise LabelSetError(f"{self.path} has no label set {name!r} (sets: {', '.join(self.label_sets) or 'none'})")
        if name not in self._sets:
            entry = self.label_sets[name]
            self._sets[name] = LabelSet(name, self.path / entry["file"], entry["level"], tuple(entry["vocab"]))
        return self._sets[name]

    def check_audio(self) -> None:
        """Every utterance's audio file must be where prepare found it (records hold absolute paths);
        a corpus that moved is one error before any work starts."""
        missing = [r["audio"] for r in self.records if not AudioRef.from_record(r).available()]
        if missing:
            raise PreparedCorpusError(
                f"{self.path}: {len(missing)} of {len(self.records)} audio files are not where prepare found them "
                f"(first: {missing[0]}); if the corpus moved, run prepare again with --root at its new place"
            )

    def verify(self, parts: tuple[str, ...]) -> None:
        """What collect checks before any work: the audio files are where prepare found them, the frame-level
        label sets among ``parts`` fit the frames, and every file collect reads of the folder (frame labels,
        manifest, the label sets of ``parts``) has the content prepare wrote: a file edited since — a label
        changed in place in the memory-mapped ``frames.npy``, say — is an error naming it, never a silent
        count of other labels.  One SHA-1 pass over the files (about 2 s for 960 h of frame labels)."""
        self.check_label_sets(parts)
        self.check_audio()
        recorded = dict(self.meta.files or {})
        for part in parts:
            recorded.update(self.label_sets.get(part, {}).get("sha1", {}))
        for name, digest in recorded.items():
            now = sha1_file(self.path / name) if (self.path / name).is_file() else "missing"
            if now != digest:
                raise PreparedCorpusError(
                    f"{self.path / name}: changed after prepare (SHA-1 {now[:12]}, written as {digest[:12]}): its labels "
                    "are no longer the ones prepare made; run prepare again (it reuses its cache) or attach the label "
                    "set again, then collect"
                )

    def content_digests(self, parts: tuple[str, ...]) -> dict[str, str | None]:
        """What a store records of the corpus it counted, so that a resume, a merge or ``browse`` refuses
        another labelling: the digest of the labels of each of ``parts`` (an attached set: the content
        hash its files are named by), of the vocabularies and of the audio files (None: prepared before
        audio digests).  A folder prepared before digests were recorded has them computed here."""
        if self._digests is None:
            self._digests = self.meta.digests or _content_digests(self.path, self.meta, self.records)
        out = {}
        for part in parts:
            if part in BASE_PARTS:
                out[f"{part} labels"] = self._digests[part]
            else:
                entry = self.label_sets.get(part)
                out[f"{part} labels"] = Path(entry["file"]).stem.rpartition("-")[2] if entry else None
        out["vocabularies"] = self._digests["vocabularies"]
        out["audio"] = self._digests["audio"]
        return out

    def check_label_sets(self, parts: tuple[str, ...]) -> None:
        """Frame-level sets among ``parts`` must still have one label per frame of every utterance they
        label (a re-prepare with another model geometry breaks that); an error names the first mismatch."""
        frames = {r["id"]: r["num_frames"] for r in self.records}
        for name in parts:
            if name not in self.label_sets or self.label_sets[name]["level"] != "frame":
                continue
            labels = self.label_set(name)
            for utt, n in labels.lengths().items():
                if utt in frames and frames[utt] != n:
                    raise LabelSetError(
                        f"{labels.path}: utterance {utt} has {n} {name!r} labels but {frames[utt]} frames in "
                        f"{self.path} ({self.geometry.describe()}); attach the label set again"
                    )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PreparedUtterance:
        return PreparedUtterance(self, self.records[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def skips(self) -> dict[str, int]:
        return dict(self.meta.skips)

    # -- writing (prepare and label sets go through these) --

    @staticmethod
    def cached_record(folder: Path, utt_id: str, key: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """The record and arrays (intervals, F0) of an utterance file written with inputs of this ``key``, else
        None."""
        try:
            cached_key, record, arrays = read_cached_utterance(folder, utt_id)
        except (OSError, ValueError):  # none yet, or not one this version can read: redo it
            return None
        return (record, arrays) if cached_key == key else None

    @staticmethod
    def clear_leftovers(folder: Path) -> None:
        """Makes ``utts/`` and removes the temporary files a stopped run left in it (call it holding the lock)."""
        utts = Path(folder) / "utts"
        utts.mkdir(parents=True, exist_ok=True)
        for leftover in [*utts.glob("*.tmp"), *utts.glob("*.tmp.npz")]:
            leftover.unlink()

    @staticmethod
    def write_utterance(folder: Path, record: dict, key: str, **arrays: np.ndarray) -> None:
        """Writes ``utts/<id>.utt`` (the key of its inputs, the record, intervals and F0), and removes an earlier
        neurostat's file of the utterance."""
        path = _utterance_file(folder, record["id"])
        try:
            write_utterance_file(path, key, record, arrays)
        except FileNotFoundError:  # labelled without prepare_source, which makes utts/ first
            path.parent.mkdir(parents=True, exist_ok=True)
            write_utterance_file(path, key, record, arrays)
        _earlier_utterance_file(folder, record["id"]).unlink(missing_ok=True)

    @classmethod
    def create(
        cls,
        folder: str | Path,
        meta: PreparedMeta,
        records: list[dict],
        skips: list[dict],
        arrays: list[dict[str, np.ndarray]] | None = None,
    ) -> PreparedCorpus:
        """Writes the frame labels (from each record's cache ``arrays``, as prepare has them in memory, else read
        from ``utts/``), manifest, skips and meta.json (the last,
        atomically: a folder without it is unfinished).  An earlier ``meta.json`` is moved aside first
        (:data:`PREVIOUS_META`), so that a run stopped while it writes leaves an unfinished folder, never new
        label files under the old ``meta.json``.  Label sets attached to an earlier prepare into ``folder``
        whose files are still there are kept."""
        folder = Path(folder)
        old = {}
        for name in ("meta.json", PREVIOUS_META):
            try:
                old = json.loads((folder / name).read_text()).get("label_sets", {})
                break
            except (OSError, ValueError):
                continue
        if (folder / "meta.json").is_file():
            os.replace(folder / "meta.json", folder / PREVIOUS_META)
        digests = _Digests(meta)
        cached = _read_cache(folder, records) if arrays is None else zip(records, arrays, strict=True)
        files = FrameLabels.write(folder, meta, records, (digests.add(r, a) for r, a in cached))
        for name, rows in ((MANIFEST, records), ("skips.jsonl", skips)):
            atomic_write(folder / name, "".join(json.dumps(r) + "\n" for r in rows))
        files[MANIFEST] = sha1_file(folder / MANIFEST)
        meta = meta.replace(
            label_sets={n: e for n, e in old.items() if (folder / e["file"]).is_file()},
            digests=digests.result(records),
            files=files,
        )
        atomic_write(folder / "meta.json", json.dumps(meta.to_dict(), indent=1))
        (folder / PREVIOUS_META).unlink(missing_ok=True)
        return cls(folder)

    def _update_label_sets(self, name: str, entry: dict | None) -> None:
        meta_path = self.path / "meta.json"
        meta = PreparedMeta.from_dict(_read_json(meta_path), meta_path)  # as on disk now
        sets = {n: e for n, e in meta.label_sets.items() if n != name}
        if entry is not None:
            sets[name] = entry
        atomic_write(meta_path, json.dumps(meta.replace(label_sets=sets).to_dict(), indent=1))
        self.reload()

    def write_label_set(self, name: str, entry: dict, stem: str, **arrays: np.ndarray) -> dict:
        """Writes label set ``name``'s files ``labels/<stem>.npz`` (ids, offsets, vocab) and
        ``<stem>.values.npy``, then switches meta.json to them in one rename and deletes the old files;
        returns the meta entry (with its ``file``)."""
        folder = self.path / "labels"
        folder.mkdir(exist_ok=True)
        np.save(folder / f"{stem}.values.tmp.npy", arrays.pop("values"))
        np.savez(folder / f"{stem}.tmp.npz", **arrays)
        files = {}
        for file in (f"{stem}.values.npy", f"{stem}.npz"):
            tmp = folder / file.replace(".np", ".tmp.np")
            files[f"labels/{file}"] = sha1_file(tmp)
            os.replace(tmp, folder / file)
        entry = {**entry, "file": f"labels/{stem}.npz", "sha1": files}
        self._update_label_sets(name, entry)
        for old in folder.glob(f"{name}-*"):
            if not old.name.startswith(stem):
                old.unlink()
        return entry

    def remove_label_set(self, name: str) -> None:
        """Detaches label set ``name`` and deletes its files (labels, and centroids when clustered)."""
        if name not in self.label_sets:
            raise LabelSetError(f"{self.path} has no label set {name!r} (sets: {', '.join(self.label_sets) or 'none'})")
        self._update_label_sets(name, None)
        for pattern in (f"{name}-*", f"{name}.*"):
            for path in (self.path / "labels").glob(pattern):
                path.unlink()

    def save_centroids(self, name: str, centroids: np.ndarray) -> str:
        """Writes k-means centroids beside label set ``name``; returns their path relative to the folder."""
        (self.path / "labels").mkdir(exist_ok=True)
        relative = f"labels/{name}.centroids.npy"
        np.save(self.path / relative, centroids)
        return relative


def _read_json(path: Path) -> dict:
    """A JSON file of the folder; a truncated or edited one is an error naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise PreparedCorpusError(
            f"{path}: not valid JSON ({e}); it was cut short or edited: re-run neurostat prepare into "
            f"{path.parent} (it reuses its cached utterances)"
        ) from None


def _read_cache(folder: Path, records: list[dict]) -> Iterator[tuple[dict, dict[str, np.ndarray]]]:
    """Each record with the arrays of its cache file in ``utts/`` (intervals, F0, given pitch bins)."""
    for r in records:
        try:
            yield r, read_cached_utterance(folder, r["id"])[2]
        except (OSError, ValueError) as e:
            raise PreparedCorpusError(
                f"{_utterance_file(folder, r['id'])}: cannot read the cache of utterance {r['id']} ({e}); run "
                f"neurostat prepare into {folder} again"
            ) from None


class _Digests:
    """SHA-1 digests of what the labels are made of, utterance by utterance (ids included): the phone
    intervals and frame counts, the genders, the F0 tracks (or given pitch bins) with the bin edges and
    rule, the base vocabularies, and the audio files' recorded digests (None when a record lacks one)."""

    def __init__(self, meta: PreparedMeta):
        self.meta, self.phone, self.gender, self.pitch = meta, hashlib.sha1(), hashlib.sha1(), hashlib.sha1()
        self.pitch.update(json.dumps([meta.pitch.edges, meta.pitch.rule, meta.pitch.bins]).encode())

    def add(self, r: dict, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds one utterance (its record and cached arrays); returns the arrays."""
        key = f"{r['id']}:{r['num_frames']}:".encode()
        pitch = ("pitch_bins",) if "pitch_bins" in arrays else ("f0",)
        for digest, names in ((self.phone, ("starts", "ends", "phone")), (self.pitch, pitch)):
            digest.update(key)
            for name in names:
                array = np.ascontiguousarray(arrays[name])
                digest.update(array.dtype.str.encode() + array.tobytes())
        self.gender.update(f"{r['id']}:{r['gender']};".encode())
        return arrays

    def result(self, records: list[dict]) -> dict[str, str | None]:
        meta, audio = self.meta, [r.get("audio_sha1") for r in records]
        vocabularies = json.dumps([meta.phones, meta.genders, meta.pitch.bins])
        return {
            "phone": self.phone.hexdigest(),
            "gender": self.gender.hexdigest(),
            "pitch_bin": self.pitch.hexdigest(),
            "vocabularies": hashlib.sha1(vocabularies.encode()).hexdigest(),
            "audio": None
            if None in audio
            else hashlib.sha1("".join(f"{r['id']}:{a};" for r, a in zip(records, audio)).encode()).hexdigest(),
        }


def _content_digests(folder: Path, meta: PreparedMeta, records: list[dict]) -> dict[str, str | None]:
    """The content digests (:class:`_Digests`) from prepare's cache."""
    digests = _Digests(meta)
    for r, arrays in _read_cache(folder, records):
        digests.add(r, arrays)
    return digests.result(records)
