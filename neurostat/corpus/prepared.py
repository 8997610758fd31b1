"""The prepared-corpus folder: :class:`PreparedCorpus` is its only reader and writer.

Layout (written by ``neurostat prepare`` and by attaching label sets):

- ``meta.json`` – vocabularies, phone mapping, frame geometry, pitch method and bin edges,
  settings, counts, skips by reason, the attached label sets and the content digests
  (:meth:`PreparedCorpus.content_digests`);
- ``manifest.jsonl`` – one line per usable utterance (id, speaker, gender, audio path and its SHA-1,
  lengths);
- ``skips.jsonl`` – one line per skipped utterance (id, reason, file, message);
- ``utts/<id>.npz`` – phone intervals (seconds, phone index) and F0 at every frame centre, with the
  key of their inputs (a later prepare reuses the file when the key matches);
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
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

import numpy as np

from ..files import atomic_write
from ..frames import FrameGeometry, label_frames, label_frames_overlap
from ..version import __version__
from .audio import Skip, load_audio
from .pitch import assign_bins

FORMAT = 2
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
    subset: str
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
    version: str = __version__

    def to_dict(self) -> dict:
        out = {"neurostat_version": self.version, "format": FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "version" or (f.name in ("paper_labels", "digests") and value is None):
                continue
            out[f.name] = value.to_dict() if isinstance(value, PitchMeta) else value
        return out

    @classmethod
    def from_dict(cls, d: dict, where: Path) -> PreparedMeta:
        if d.get("format") != FORMAT:
            raise PreparedCorpusError(
                f"{where}: prepared-corpus format {d.get('format')} is not {FORMAT}; re-run prepare"
            )
        names = {f.name for f in fields(cls)} - {"version"}
        try:
            values = {k: v for k, v in d.items() if k in names}
            return cls(**{**values, "pitch": PitchMeta(**d["pitch"])}, version=d.get("neurostat_version", "?"))
        except (KeyError, TypeError) as e:
            raise PreparedCorpusError(f"{where}: meta.json is incomplete ({e}); re-run prepare") from None

    def replace(self, **changes) -> PreparedMeta:
        return dataclasses.replace(self, **changes)


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
    """Whether ``folder`` is a prepared corpus, finished (``meta.json``) or interrupted (``utts/``): the only
    kind of non-empty folder ``prepare`` writes into (it reuses what is cached there)."""
    return (folder / "meta.json").is_file() or (folder / "utts").is_dir()


def _utterance_file(folder: Path, utt_id: str) -> Path:
    return Path(folder) / "utts" / f"{utt_id}.npz"


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
    def _arrays(self) -> dict[str, np.ndarray]:
        with np.load(_utterance_file(self.corpus.path, self.id)) as z:
            return {k: z[k] for k in ("starts", "ends", "phone", "f0", "pitch_bins") if k in z.files}

    @property
    def intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start s, end s, phone index into ``corpus.phones``) of each aligned interval."""
        a = self._arrays
        return a["starts"], a["ends"], a["phone"]

    @property
    def f0(self) -> np.ndarray:
        """F0 in Hz at each frame centre of the prepared geometry (NaN = unvoiced)."""
        return self._arrays["f0"]

    def phone_frames(self, geometry: FrameGeometry | None = None) -> np.ndarray:
        """Phone index of each frame by the corpus's frame labelling (the interval containing the frame
        centre, or the one of largest overlap with its stride cell), −1 where there is none."""
        geo = geometry or self.corpus.geometry
        n = geo.num_frames(self.record["num_samples"]) if geometry else self.num_frames
        if self.corpus.meta.frame_labels == "overlap":
            return label_frames_overlap(*self.intervals, geo.stride / geo.sample_rate, n)
        return label_frames(*self.intervals, geo.centres(n))

    def pitch_bins(self) -> np.ndarray:
        """Pitch-bin index of each frame by the corpus's bin rule (the last bin is ``unvoiced``), or the
        bins the corpus was given (official label files)."""
        if "pitch_bins" in self._arrays:
            return self._arrays["pitch_bins"].astype(np.int64)
        return assign_bins(self.f0.astype(np.float64), self.corpus.edges, self.corpus.meta.pitch.rule)

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

    def load_audio(self) -> np.ndarray:
        """The waveform at the prepared geometry's sample rate (float32, mono).  A file whose content is not
        what prepare read (its SHA-1, recorded at prepare) is an :class:`AudioChangedError` naming it."""
        wave, _, digest = load_audio(self.audio_path, self.corpus.geometry.sample_rate, strict=self.corpus.meta.strict)
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
            raise PreparedCorpusError(
                f"{self.path} is not a prepared corpus (no meta.json); run `neurostat prepare` first"
            )
        self.reload()

    def reload(self) -> None:
        """Reads meta.json and the manifest again (after a label set was attached or removed)."""
        meta_path = self.path / "meta.json"
        self.meta = PreparedMeta.from_dict(json.loads(meta_path.read_text()), meta_path)
        lines = (self.path / "manifest.jsonl").read_text().splitlines()
        self.records = [json.loads(line) for line in lines if line.strip()]
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
        missing = [r["audio"] for r in self.records if not Path(r["audio"]).is_file()]
        if missing:
            raise PreparedCorpusError(
                f"{self.path}: {len(missing)} of {len(self.records)} audio files are not where prepare found them "
                f"(first: {missing[0]}); if the corpus moved, run prepare again with --root at its new place"
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
    def cached_record(folder: Path, utt_id: str, key: str) -> dict | None:
        """The record of an utterance file written with inputs of this ``key``, else None."""
        path = _utterance_file(folder, utt_id)
        if not path.is_file():
            return None
        with np.load(path) as cached:
            return json.loads(str(cached["record"])) if str(cached["key"]) == key else None

    @staticmethod
    def write_utterance(folder: Path, record: dict, key: str, **arrays: np.ndarray) -> None:
        """Writes ``utts/<id>.npz`` (the record, the key of its inputs, intervals and F0) in one rename."""
        target = _utterance_file(folder, record["id"])
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp.npz")
        np.savez(tmp, key=key, record=json.dumps(record), **arrays)
        os.replace(tmp, target)

    @staticmethod
    def read_f0(folder: Path, utt_id: str) -> np.ndarray:
        with np.load(_utterance_file(folder, utt_id)) as z:
            return z["f0"]

    @classmethod
    def create(cls, folder: str | Path, meta: PreparedMeta, records: list[dict], skips: list[dict]) -> PreparedCorpus:
        """Writes manifest, skips and meta.json (the last, atomically: a folder without it is unfinished).
        Label sets attached to an earlier prepare into ``folder`` whose files are still there are kept."""
        folder = Path(folder)
        try:
            old = json.loads((folder / "meta.json").read_text()).get("label_sets", {})
        except (OSError, ValueError):
            old = {}
        meta = meta.replace(
            label_sets={n: e for n, e in old.items() if (folder / e["file"]).is_file()},
            digests=_content_digests(folder, meta, records),
        )
        for name, rows in (("manifest.jsonl", records), ("skips.jsonl", skips)):
            atomic_write(folder / name, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write(folder / "meta.json", json.dumps(meta.to_dict(), indent=1))
        return cls(folder)

    def _update_label_sets(self, name: str, entry: dict | None) -> None:
        meta_path = self.path / "meta.json"
        meta = PreparedMeta.from_dict(json.loads(meta_path.read_text()), meta_path)  # as on disk now
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
        os.replace(folder / f"{stem}.values.tmp.npy", folder / f"{stem}.values.npy")
        os.replace(folder / f"{stem}.tmp.npz", folder / f"{stem}.npz")
        entry = {**entry, "file": f"labels/{stem}.npz"}
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


def _content_digests(folder: Path, meta: PreparedMeta, records: list[dict]) -> dict[str, str | None]:
    """SHA-1 digests of what the labels are made of, utterance by utterance (ids included): the phone
    intervals and frame counts, the genders, the F0 tracks (or given pitch bins) with the bin edges and
    rule, the base vocabularies, and the audio files' recorded digests (None when a record lacks one)."""
    phone, gender, pitch = hashlib.sha1(), hashlib.sha1(), hashlib.sha1()
    pitch.update(json.dumps([meta.pitch.edges, meta.pitch.rule, meta.pitch.bins]).encode())
    for r in records:
        key = f"{r['id']}:{r['num_frames']}:".encode()
        with np.load(_utterance_file(folder, r["id"])) as z:
            for digest, names in (
                (phone, ("starts", "ends", "phone")),
                (pitch, ("pitch_bins",) if "pitch_bins" in z.files else ("f0",)),
            ):
                digest.update(key)
                for name in names:
                    array = np.ascontiguousarray(z[name])
                    digest.update(array.dtype.str.encode() + array.tobytes())
        gender.update(f"{r['id']}:{r['gender']};".encode())
    audio = [r.get("audio_sha1") for r in records]
    vocabularies = json.dumps([meta.phones, meta.genders, meta.pitch.bins])
    return {
        "phone": phone.hexdigest(),
        "gender": gender.hexdigest(),
        "pitch_bin": pitch.hexdigest(),
        "vocabularies": hashlib.sha1(vocabularies.encode()).hexdigest(),
        "audio": None
        if None in audio
        else hashlib.sha1("".join(f"{r['id']}:{a};" for r, a in zip(records, audio)).encode()).hexdigest(),
    }
