"""Corpus sources: each corpus layout becomes a list of :class:`UtteranceRecord` that ``prepare`` labels.

A source (LibriSpeech, TIMIT, Lhotse manifests, a CSV/JSONL manifest) knows its layout and nothing else does:
it scans its files into records — id, speaker, gender or none, where the audio is (a file, a span of one, or
a Lhotse recording) and where the phone intervals come from (a TextGrid, a TIMIT ``.PHN`` file, or intervals
given inline) — plus the utterances it had to leave out and what the corpus lacks.  Everything after
(F0, pitch bins, frame labels, caching, skips, digests) works from the records alone.  A scan is a plain
list of small picklable records, so it can be split across processes or ranks (``records[rank::world]``).

Phone times are on the timeline of the audio file (or Lhotse recording) they describe, as Lhotse keeps
them; an utterance that is a span ``[start, end)`` of its file takes the intervals inside the span,
measured from its start.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

import numpy as np

from ..choices import LAYOUTS, UNKNOWN_GENDER
from ..errors import OptionError
from ..phones import PhoneMap
from .audio import load_audio
from .lhotseaudio import load_recording


class CorpusError(ValueError):
    """A corpus that cannot be read as a whole (missing folders, duplicate ids, an unreadable manifest)."""


@dataclass(frozen=True)
class AudioRef:
    """Where an utterance's samples are: a whole ``path``, the span ``[start, end)`` seconds of it, or (with
    ``recording``) what Lhotse reads of that recording (``path`` then names its source for messages)."""

    path: str
    start: float | None = None
    end: float | None = None
    recording: dict | None = None  # a Lhotse Recording's to_dict()
    channel: int | None = None  # the Lhotse channel of a multi-channel recording

    @property
    def span(self) -> tuple[float, float] | None:
        return None if self.start is None else (self.start, self.end)

    def fields(self) -> dict:
        """What the prepared manifest records of the audio (the path, and the span and recording when there)."""
        out: dict = {"audio": self.path}
        if self.start is not None:
            out |= {"start": self.start, "end": self.end}
        if self.recording is not None:
            out |= {"recording": self.recording, "channel": self.channel}
        return out

    @classmethod
    def from_record(cls, record: dict) -> AudioRef:
        return cls(
            record["audio"], record.get("start"), record.get("end"), record.get("recording"), record.get("channel")
        )

    def available(self) -> bool:
        """Whether the audio is where it was found (a Lhotse recording: each of its local files)."""
        if self.recording is None:
            return Path(self.path).is_file()
        sources = self.recording.get("sources", [])
        return all(Path(s["source"]).is_file() for s in sources if s.get("type") == "file")

    def load(
        self, sample_rate: int, strict: bool = False, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, int, str]:
        """(waveform at ``sample_rate``, the source's rate, digest): see :func:`~neurostat.corpus.audio.load_audio`."""
        if self.recording is not None:
            return load_recording(self.recording, self.channel, self.span, sample_rate, strict, out)
        return load_audio(self.path, sample_rate, strict=strict, out=out, span=self.span)


def file_key(path: str | Path) -> list | None:
    """What the prepare cache keys a file on: its path, size and mtime (one ``stat``); None where no file is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return [str(Path(path)), st.st_size, st.st_mtime_ns] if stat.S_ISREG(st.st_mode) else None


@dataclass(frozen=True)
class PhoneSource:
    """Where an utterance's phone intervals come from: a TextGrid's ``phones`` tier (``textgrid``), a TIMIT
    ``.PHN`` file of sample offsets (``phn``), or ``intervals`` given inline (``inline``: start s, end s,
    symbol; ``path`` names where they were read for messages)."""

    kind: str
    path: str
    intervals: tuple[tuple[float, float, str], ...] = ()

    def key(self):
        """What the prepare cache keys on: the file's size and mtime, or the intervals themselves."""
        if self.kind == "inline":
            return [self.path, [list(iv) for iv in self.intervals]]
        return file_key(self.path)

    def fields(self) -> dict:
        return {{"textgrid": "textgrid", "phn": "phn"}.get(self.kind, "alignment"): self.path}


@dataclass(frozen=True)
class UtteranceRecord:
    """One utterance as a source found it (one without an alignment is a skip of the scan, not a record)."""

    id: str
    speaker: str
    gender: str | None  # one of GENDERS, or None where the corpus does not say
    audio: AudioRef
    phones: PhoneSource
    extra: dict = field(default_factory=dict)  # layout-specific fields the manifest keeps (LibriSpeech's chapter)

    def fields(self) -> dict:
        """The prepared manifest's fields of this utterance before labelling (the gender as its label)."""
        return {
            "id": self.id,
            "speaker": self.speaker,
            **self.extra,
            "gender": self.gender or UNKNOWN_GENDER,
            **self.audio.fields(),
        }


@dataclass
class SourceScan:
    """What a source found: the utterances (sorted by id), the ones it left out (skip records: id, reason,
    file, message) and what the corpus lacks (``{"gender": "why"}``)."""

    records: list[UtteranceRecord]
    skips: list[dict] = field(default_factory=list)
    lacking: dict[str, str] = field(default_factory=dict)


class CorpusSource:
    """A corpus layout: the options it was opened with, a default phone mapping and a scan of its files."""

    layout: str = ""
    own_options: tuple[str, ...] = ()
    """The keyword options of the layout (``open_source`` refuses others)."""

    def __init__(self, root: str | Path, subset: str | None = None, alignments: str | Path | None = None):
        self.root = Path(root).resolve()
        self.subset = subset
        self.alignments = None if alignments is None else Path(alignments).resolve()

    def scan(self) -> SourceScan:
        """The utterance records of the corpus (errors that concern the corpus as a whole raise CorpusError)."""
        raise NotImplementedError

    def phone_map(self, given: PhoneMap | None = None) -> PhoneMap:
        """The mapping of the corpus's phone symbols: ``given`` (a ``--phone-map`` file) laid over the layout's
        own default (the ARPAbet rule; TIMIT's shipped map)."""
        return PhoneMap() if given is None else given

    def options(self) -> dict:
        """The layout's own options as ``prepare`` records them (e.g. TIMIT's ``sa``)."""
        return {}

    def inputs(self) -> tuple[Path, ...]:
        """The folders and files the prepared folder must not overlap."""
        return tuple(p for p in (self.root, self.alignments) if p is not None)

    def default_out(self) -> Path:
        """Where the prepared folder goes when none is given: beside the corpus, ``prepared-<name>[-<subset>]``."""
        name = self.root.stem if self.root.is_file() else self.root.name
        return self.root.parent / f"prepared-{name}{'-' + self.subset if self.subset else ''}"


_SOURCES = {
    "librispeech": "librispeech:LibriSpeechSource",
    "timit": "timit:TimitSource",
    "lhotse": "lhotsecorpus:LhotseSource",
    "manifest": "manifest:ManifestSource",
}


def open_source(
    layout: str,
    root: str | Path,
    subset: str | None = None,
    alignments: str | Path | None = None,
    **options,
) -> CorpusSource:
    """The source of the corpus at ``root`` in ``layout`` (one of :data:`~neurostat.choices.LAYOUTS`);
    ``options`` are the layout's own (TIMIT: ``sa=False`` leaves out the SA sentences)."""
    if layout not in LAYOUTS:
        raise OptionError(f"unknown corpus layout {layout!r}; neurostat reads {', '.join(LAYOUTS)}")
    module, name = _SOURCES[layout].split(":")
    cls: type[CorpusSource] = getattr(import_module(f"{__package__}.{module}"), name)
    unknown = sorted(set(options) - set(cls.own_options))
    if unknown:
        flags = ", ".join("--no-sa (TIMIT's)" if o == "sa" else o for o in unknown)
        raise OptionError(f"--corpus {layout} takes no option {flags}")
    return cls(root, subset, alignments, **options)


def gender_of(value) -> str | None:
    """A gender label from a corpus's spelling (M/F, male/female, any case); None where none is given or the
    value is neither (:func:`lacking_gender` records such values)."""
    text = "" if value is None else str(value).strip().lower()
    return {"m": "M", "male": "M", "f": "F", "female": "F"}.get(text)


def lacking_gender(records: list[UtteranceRecord], given: list, why: str) -> dict[str, str]:
    """The ``lacking`` entry of a scan (empty when every record has a gender): how many records have none,
    ``why``, and the values in ``given`` (the corpus's own, one per record) that were not M or F."""
    missing = sum(r.gender is None for r in records)
    if not missing:
        return {}
    odd = sorted({str(v).strip() for v in given if v is not None and str(v).strip() and gender_of(v) is None})
    values = f"; values read as unknown: {', '.join(map(repr, odd[:5]))}" if odd else ""
    return {"gender": f"{missing} of {len(records)} utterances have no speaker gender ({why}{values})"}


def check_unique(records: list[UtteranceRecord], where: str) -> list[UtteranceRecord]:
    """The records sorted by id; two with one id are a CorpusError naming both."""
    seen: dict[str, UtteranceRecord] = {}
    for r in records:
        if r.id in seen:
            raise CorpusError(f"{where}: duplicate utterance id {r.id}: {seen[r.id].audio.path} and {r.audio.path}")
        seen[r.id] = r
    return [seen[k] for k in sorted(seen)]
