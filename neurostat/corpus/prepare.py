"""``neurostat prepare``: labels of a corpus (any layout: :mod:`neurostat.corpus.source`), written as a
prepared-corpus folder (its layout: :mod:`neurostat.corpus.prepared`).

Per-utterance files carry a key of their inputs (file sizes/mtimes, settings), so a second run
reuses what is done and redoes only what changed.  Label sets attached earlier are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pickle
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol, TypeVar
from uuid import uuid4

import numpy as np
from tqdm import tqdm

from ..choices import FRAME_LABELS, PITCH_ALIGNS, PITCH_METHODS, PITCH_RULES, UNKNOWN_GENDER
from ..errors import UserError
from ..files import check_out_folder
from ..frames import FrameGeometry
from ..machine import usable_cores
from ..phones import PHONES, PhoneMap, UnknownPhoneError
from .audio import Skip, skip_record
from .pitch import bin_names, f0_at, percentile_edges
from .prepared import CACHE_FORMAT, PitchMeta, PrepareLock, PreparedCorpus, PreparedMeta, is_prepared
from .source import CorpusSource, SourceScan, UtteranceRecord, file_key, open_source
from .speakers import GENDERS
from .textgrid import TextGridError, read_textgrid
from .timit import phn_intervals


T = TypeVar("T")


class PrepareError(UserError, RuntimeError):
    """Prepare cannot go on (``--strict`` turns every skip into one)."""


@dataclass
class PrepareSettings:
    geometry: FrameGeometry
    pitch: str = "praat"
    quantiles: tuple[float, ...] = (1 / 3, 2 / 3)
    edges: tuple[float, ...] | None = None
    phone_map: PhoneMap | None = None  # None: the corpus layout's own (see CorpusSource.phone_map)
    strict: bool = False
    frame_labels: str = "centre"  # or "overlap" (the paper: largest overlap with the stride grid cell)
    pitch_rule: str = "interval"  # or "paper" (see neurostat.corpus.pitch)
    pitch_step_ms: float | None = None  # F0 analysis step; None: half the model's stride
    pitch_align: str = "time"  # or "paper" (the official code: the track left-padded to the labels)

    @classmethod
    def from_options(
        cls,
        geometry: FrameGeometry,
        pitch: str = "praat",
        pitch_bins: int = 3,
        pitch_edges: str | tuple[float, ...] | None = None,
        phone_map: str | Path | None = None,
        strict: bool = False,
        frame_labels: str = "centre",
        pitch_rule: str = "interval",
        pitch_percentiles: str | tuple[float, ...] | None = None,
        pitch_step_ms: float | None = None,
        pitch_align: str = "time",
    ) -> "PrepareSettings":
        """Settings from the command line's options: ``pitch_bins`` voiced bins at equal corpus percentiles,
        or at ``pitch_percentiles`` (e.g. ``"33,66"``, the paper's), or ``pitch_edges`` in Hz (a tuple or
        ``"129.03,179.78"``); ``phone_map`` a JSON/TSV file laid over the layout's own mapping."""
        if pitch_bins < 1:
            raise PrepareError(f"--pitch-bins {pitch_bins}: need at least one pitch bin")
        pitch_edges = _numbers(pitch_edges, "--pitch-edges")
        percentiles = _numbers(pitch_percentiles, "--pitch-percentiles")
        if percentiles and not all(0 < p < 100 for p in percentiles):
            raise PrepareError(f"--pitch-percentiles {pitch_percentiles}: percentiles lie strictly between 0 and 100")
        if frame_labels not in FRAME_LABELS:
            raise PrepareError(f"unknown frame labelling {frame_labels!r}; choose from {FRAME_LABELS}")
        if frame_labels == "overlap" and geometry.conv_padding:
            raise PrepareError(
                "--frame-labels overlap is the paper's grid of stride cells from sample 0, which a padded front end's "
                f"frames (Whisper's, centred at stride · t: {geometry.describe()}) are not on; label by centre"
            )
        if pitch_rule not in PITCH_RULES:
            raise PrepareError(f"unknown pitch rule {pitch_rule!r}; choose from {PITCH_RULES}")
        stride_ms = 1000 * geometry.stride / geometry.sample_rate
        if pitch_align not in PITCH_ALIGNS:
            raise PrepareError(f"unknown pitch alignment {pitch_align!r}; choose from {PITCH_ALIGNS}")
        if pitch_align == "paper" and pitch_step_ms != stride_ms:
            raise PrepareError(
                f"--pitch-align paper puts one F0 frame on each model frame: it needs --pitch-step-ms {stride_ms:g} "
                f"(the model's stride), got {pitch_step_ms}"
            )
        return cls(
            geometry=geometry,
            pitch=pitch,
            quantiles=tuple(p / 100 for p in percentiles)
            if percentiles
            else tuple(i / pitch_bins for i in range(1, pitch_bins)),
            edges=pitch_edges,
            phone_map=PhoneMap.from_file(phone_map) if phone_map else None,
            strict=strict,
            frame_labels=frame_labels,
            pitch_rule=pitch_rule,
            pitch_step_ms=pitch_step_ms,
            pitch_align=pitch_align,
        )

    @property
    def pitch_step(self) -> float:
        """Seconds between F0 analysis frames."""
        if self.pitch_step_ms is not None:
            return self.pitch_step_ms / 1000
        return self.geometry.stride / self.geometry.sample_rate / 2

    def differences(self, meta: PreparedMeta) -> list[str]:
        """How a prepared corpus's labelling differs from these settings (empty: it is what they make).
        A corpus of official labels (``prepare --paper-labels``) carries its own pitch classes."""
        pitch = meta.pitch
        quantiles = None if self.edges is not None else [round(q, 6) for q in self.quantiles]
        pairs = {
            "frame labels": (meta.frame_labels, self.frame_labels),
            "pitch rule": (pitch.rule, self.pitch_rule),
        }
        if pitch.method != "paper-labels":
            pairs |= {
                "pitch method": (pitch.method, self.pitch),
                "pitch alignment": (pitch.align, self.pitch_align),
                "pitch step (s)": (pitch.step_seconds, self.pitch_step),
                "pitch percentiles": (
                    None if pitch.quantiles is None else [round(q, 6) for q in pitch.quantiles],
                    quantiles,
                ),
                "pitch edges (Hz)": (
                    None if pitch.quantiles is not None else pitch.edges,
                    self.edges and list(self.edges),
                ),
            }
        return [f"{name} {have} (wanted {want})" for name, (have, want) in pairs.items() if have != want]

    def key(self) -> dict:
        return {
            "geometry": self.geometry.to_dict(),
            "pitch": self.pitch,
            "phone_map": None if self.phone_map is None else self.phone_map.describe(),  # None: the layout's own
            "strict": self.strict,
            "pitch_step": self.pitch_step,
            "format": CACHE_FORMAT,
            # only when not the default, so that utterances prepared before the option stay cached
            **({"pitch_align": self.pitch_align} if self.pitch_align != "time" else {}),
        }


def _numbers(value, option: str) -> tuple[float, ...] | None:
    """A tuple of numbers from ``"1,2"`` or a sequence; None for none."""
    if not value:
        return None
    if isinstance(value, str):
        try:
            return tuple(float(x) for x in value.split(","))
        except ValueError:
            raise PrepareError(f"{option} {value!r} is not a comma-separated list of numbers") from None
    return tuple(float(x) for x in value)


def _utt_key(fields: dict, utt: UtteranceRecord, settings: PrepareSettings) -> str:
    """The key of everything a record depends on: the utterance's metadata (speaker, gender, paths, span), its
    local audio file and its alignment (file size and mtime, or the intervals themselves) and the settings."""
    blob = json.dumps([fields, file_key(utt.audio.path), utt.phones.key(), settings.key()], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _raw_intervals(utt: UtteranceRecord, source_rate: int, source_samples: int, resampled: bool):
    """(starts, ends, symbols) of the utterance's phones on its audio file's timeline."""
    phones = utt.phones
    if phones.kind == "inline":
        items = phones.intervals
        return [i[0] for i in items], [i[1] for i in items], [i[2] for i in items]
    if phones.kind == "phn":
        return phn_intervals(phones.path, source_rate, source_samples + resampled)  # resampling may drop a sample
    grid = read_textgrid(phones.path)
    tiers = {name.lower(): items for name, items in grid.tiers.items()}
    if "phones" not in tiers:
        raise Skip("no-phones-tier", phones.path, f"no 'phones' tier (tiers: {', '.join(grid.tiers) or 'none'})")
    items = tiers["phones"]
    return [iv.xmin for iv in items], [iv.xmax for iv in items], [iv.text for iv in items]


def phone_intervals(
    utt: UtteranceRecord, phone_map: PhoneMap, duration: float, frame: float, source_rate: int, resampled: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start s, end s, phone index) of the utterance's aligned intervals, measured from its start.  A whole
    file's alignment must end within one ``frame`` of its ``duration``; a span's must cover it (a TextGrid's or
    ``.PHN``'s) or lie inside it (intervals given inline), and is cut to it.  Problems are Skips."""
    where = utt.phones.path
    starts, ends, symbols = _raw_intervals(utt, source_rate, round(duration * source_rate), resampled)
    if not len(symbols):
        raise Skip("no-phones-tier", where, "the phone alignment is empty")
    starts, ends = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    span = utt.audio.span
    if span is None:
        end = ends[-1]
        if abs(end - duration) > frame:
            side = "before" if end < duration else "after"
            raise Skip(
                "length-mismatch",
                where,
                f"alignment ends at {end:.3f} s, {abs(end - duration):.3f} s {side} the audio ({duration:.3f} s); more than one frame ({frame:.3f} s)",
            )
    else:
        first, last = span
        covers = starts[0] <= first + frame and ends[-1] >= last - frame
        inside = starts[0] >= first - frame and ends[-1] <= last + frame
        if not (inside if utt.phones.kind == "inline" else covers):
            raise Skip(
                "length-mismatch",
                where,
                f"alignment spans {starts[0]:.3f}-{ends[-1]:.3f} s, the utterance {first:.3f}-{last:.3f} s of its "
                f"audio ({'it must lie inside' if utt.phones.kind == 'inline' else 'it must cover it'}, to one frame)",
            )
        keep = (ends > first) & (starts < last)
        starts, ends = starts[keep], ends[keep]
        symbols = [sym for sym, k in zip(symbols, keep) if k]
        # times from the utterance's start, to Lhotse's 8 decimals: a span cut at whole samples gives the
        # intervals of the same utterance in its own file exactly
        starts = np.round(np.maximum(starts, first) - first, 8)
        ends = np.round(np.minimum(ends, last) - first, 8)
    try:
        ids = np.array([PHONES.index(phone_map(symbol)) for symbol in symbols], dtype=np.int16)
    except UnknownPhoneError as e:
        raise Skip("unknown-phone", where, str(e)) from None
    keep = ends > starts
    return starts[keep], ends[keep], ids[keep]


def _label_one(utt: UtteranceRecord, out_dir: Path, settings: PrepareSettings) -> tuple[str, dict, dict | None]:
    """Labels one utterance: ("ok", its record, its cached arrays) or ("skip", the skip record, None)."""
    fields = utt.fields()
    try:
        try:
            key = _utt_key(fields, utt, settings)
        except OSError as e:
            raise Skip("missing-textgrid", utt.phones.path, f"cannot read the alignment ({e.strerror})") from None
        cached = PreparedCorpus.cached_record(out_dir, utt.id, key)
        if cached is not None and "audio_sha1" in cached[0]:  # records from before audio digests are redone
            return "ok", *cached
        geo = settings.geometry
        wave, source_rate, audio_sha1 = utt.audio.load(geo.sample_rate, strict=settings.strict)
        n_frames = geo.num_frames(len(wave))
        if n_frames == 0:
            raise Skip(
                "too-short",
                utt.audio.path,
                f"{len(wave)} samples is shorter than one frame ({geo.receptive_field} samples)",
            )
        starts, ends, ids = phone_intervals(
            utt,
            settings.phone_map,
            len(wave) / geo.sample_rate,
            geo.stride / geo.sample_rate,
            source_rate,
            source_rate != geo.sample_rate,
        )
        centres, cells = geo.centres(n_frames), len(wave) // geo.stride  # cells: the official int(duration·50)
        f0 = f0_at(settings.pitch, wave, geo.sample_rate, centres, settings.pitch_step, settings.pitch_align, cells)
    except TextGridError as e:
        return "skip", skip_record(utt.id, "bad-textgrid", utt.phones.path, str(e)), None
    except Skip as s:
        return "skip", s.record(utt.id), None
    record = {
        **fields,
        **utt.phones.fields(),
        "num_samples": len(wave),
        "num_frames": n_frames,
        "source_sample_rate": source_rate,
        "resampled": source_rate != geo.sample_rate,
        "audio_sha1": audio_sha1,
    }
    arrays = {"starts": starts, "ends": ends, "phone": ids, "f0": f0.astype(np.float32)}
    PreparedCorpus.write_utterance(out_dir, record, key, **arrays)
    return "ok", record, arrays


Labelled = tuple[int, str, dict, dict | None]
"""One utterance labelled: its position in the scan, ``ok`` or ``skip``, its record or skip record, and the arrays
of its cache file (intervals, F0), which travel to the folder's writer in memory instead of being read back."""


def _label_span(
    utterances: list[UtteranceRecord], first: int, out_dir: Path, settings: PrepareSettings
) -> list[Labelled]:
    """Labels consecutive utterances of the scan, the first at position ``first``."""
    return [(first + i, *_label_one(utt, out_dir, settings)) for i, utt in enumerate(utterances)]


class Ranks(Protocol):
    """The processes that prepare one corpus together, as :func:`prepare_source` uses them: this process alone
    (:class:`OneProcess`) or torchrun's ranks (``neurostat.engine.distributed.PrepareRanks``)."""

    rank: int
    size: int
    local_size: int  # the job's processes on this machine, which share its cores

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""

    def gather(self, value) -> list | None:
        """Every rank's ``value`` in rank order, on rank 0 (None on the others)."""

    def add(self, key: str, amount: int) -> int:
        """Adds ``amount`` to the job's counter ``key`` (0 at first), atomically for all ranks; its new value."""


class OneProcess:
    """The :class:`Ranks` of a prepare in this process alone."""

    rank, size, local_size = 0, 1, 1

    def __init__(self):
        self._counters: Counter = Counter()

    def broadcast(self, value: T) -> T:
        return value

    def gather(self, value) -> list:
        return [value]

    def add(self, key: str, amount: int) -> int:
        self._counters[key] += amount
        return self._counters[key]


UTTERANCES_PER_WORKER = 16
"""The fewest utterances a default labelling worker gets: below that a pool costs more than it gives."""


def default_prepare_jobs(utterances: int, ranks: Ranks) -> int:
    """Labelling workers per process when ``-j`` is not given: the cores this process may use, shared among
    the job's processes on this machine, and at most one per :data:`UTTERANCES_PER_WORKER` of its share of
    ``utterances``.  One process's F0 (Praat) already runs on two threads, but the rest of labelling (decode,
    alignments, cache files) holds one core: on 2 cores, 2 workers prepared in 0.82 of one's time."""
    cores = max(1, usable_cores() // max(1, getattr(ranks, "local_size", 1)))  # Ranks of before local_size: 1
    return max(1, min(cores, utterances // (ranks.size * UTTERANCES_PER_WORKER)))


def _forget(fd: int | None) -> None:
    """A worker's first act: closing its copy of the folder lock's descriptor, so that the lock dies with prepare."""
    if fd is not None:
        os.close(fd)


def _label_claimed(
    utterances: list[UtteranceRecord],
    out_dir: Path,
    settings: PrepareSettings,
    num_jobs: int,
    ranks: Ranks,
    key: str,
    bar: tqdm,
    lock_fd: int | None = None,
) -> list[Labelled]:
    """Labels the utterances this process claims — spans of the scan taken in turn from the job's counter
    ``key`` until none is left, so that a rank (or worker) that is faster, or finds more of its spans cached,
    takes more — with ``num_jobs`` worker processes; the bar counts the whole job's utterances."""
    n, num_jobs = len(utterances), max(1, num_jobs)  # 0 as 1: labelled in this process
    span = max(1, min(8, n // (8 * ranks.size * num_jobs)))
    labelled: list[Labelled] = []

    def claims():
        while (end := ranks.add(f"{key}/claimed", span)) - span < n:
            yield end - span, min(end, n)

    def finished(part: list[Labelled]) -> None:
        labelled.extend(part)
        bar.update(ranks.add(f"{key}/done", len(part)) - bar.n)

    if num_jobs <= 1:
        for a, b in claims():
            finished(_label_span(utterances[a:b], a, out_dir, settings))
        return labelled
    # forked, whatever the platform's default (forkserver from Python 3.14): a worker inherits the lock's
    # descriptor, which it closes first
    fork = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(num_jobs, mp_context=fork, initializer=_forget, initargs=(lock_fd,)) as pool:
        spans = claims()

        def submit(a: int, b: int) -> Future:
            return pool.submit(_label_span, utterances[a:b], a, out_dir, settings)

        pending = {submit(a, b) for a, b in islice(spans, 2 * num_jobs)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(future.result())
                pending |= {submit(a, b) for a, b in islice(spans, 1)}
    return labelled


def label_utterances(
    utterances: list[UtteranceRecord],
    out: Path,
    settings: PrepareSettings,
    num_jobs: int | None = None,
    progress: bool = True,
    desc: str = "prepare",
) -> tuple[list[dict], list[dict]]:
    """Labels each utterance into ``out``'s cache (reusing what is cached) with ``num_jobs`` worker processes
    (None: :func:`default_prepare_jobs`); returns (records, skips) in the order given.  Any slice of a scan's
    records can be labelled apart (:func:`prepare_source` shares a scan between torchrun's ranks by itself)."""
    one = OneProcess()
    jobs = default_prepare_jobs(len(utterances), one) if num_jobs is None else num_jobs
    with tqdm(total=len(utterances), desc=desc, unit="utt", disable=not progress) as bar:
        labelled = _label_claimed(utterances, Path(out), settings, jobs, one, "label", bar)
    labelled.sort(key=lambda x: x[0])
    return [r for _, kind, r, _ in labelled if kind == "ok"], [r for _, kind, r, _ in labelled if kind == "skip"]


def default_prepared_dir(alignments: str | Path, subset: str) -> Path:
    """Where a prepared corpus goes when no folder is given: ``<alignments>/../prepared-<subset>``."""
    return Path(alignments).parent / f"prepared-{subset}"


def prepare(
    root: str | Path,
    subset: str | None,
    alignments: str | Path | None,
    out: str | Path | None,
    settings: PrepareSettings,
    num_jobs: int | None = None,
    progress: bool = True,
    layout: str = "librispeech",
    source_options: dict | None = None,
    ranks: Ranks | None = None,
) -> PreparedMeta:
    """Prepares the corpus at ``root`` (in the ``layout`` of :data:`~neurostat.choices.LAYOUTS`, with its own
    ``source_options``; ``subset`` and ``alignments`` as the layout takes them) into ``out`` (default: the
    source's, for LibriSpeech :func:`default_prepared_dir`); returns its :class:`PreparedMeta`.  ``ranks``: see
    :func:`prepare_source`."""
    source = open_source(layout, root, subset, alignments, **(source_options or {}))
    return prepare_source(source, out, settings, num_jobs, progress, ranks)


def prepare_source(
    source: CorpusSource,
    out: str | Path | None,
    settings: PrepareSettings,
    num_jobs: int | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> PreparedMeta:
    """Prepares the utterances of ``source`` into ``out`` (default :meth:`CorpusSource.default_out`): the scan
    (corpus-wide problems raise before anything is written), the labels of each utterance (``num_jobs`` worker
    processes; None: :func:`default_prepare_jobs`), the pitch-bin edges over the corpus, then the folder's
    files; returns its :class:`PreparedMeta`.

    The folder has one writer (:class:`~neurostat.corpus.prepared.PrepareLock`): a second prepare into it is
    refused, naming the process that holds it.  With ``ranks`` (torchrun's processes, on one machine or
    several, sharing the folder) the job prepares the corpus together: rank 0 takes the lock for the job and
    scans, every rank labels the spans of the scan it claims (with its ``num_jobs`` workers), rank 0 gathers
    their records and arrays (intervals, F0), computes the edges and writes the files, exactly as one process
    does, and every rank returns the meta.  An error of rank 0's is raised on every rank."""
    if settings.pitch not in PITCH_METHODS:
        raise PrepareError(f"unknown pitch method {settings.pitch!r}; choose one of {PITCH_METHODS}")
    ranks = ranks or OneProcess()
    lock: PrepareLock | None = None

    def start() -> tuple[Path, SourceScan, PrepareSettings, str]:
        nonlocal lock
        folder = check_out_folder(
            source.default_out() if out is None else out, "prepared corpus", is_prepared, source.inputs()
        )
        lock = PrepareLock(folder) if folder.is_dir() else None  # a folder being written exists: refused at once
        scan = source.scan()
        lock = lock or PrepareLock(folder)
        if lock.taken_over:
            tqdm.write(f"{folder}: taking over the lock of {lock.taken_over}, which stopped while it prepared")
        PreparedCorpus.clear_leftovers(folder)
        return folder, scan, dataclasses.replace(settings, phone_map=source.phone_map(settings.phone_map)), uuid4().hex

    try:
        folder, scan, settings, job = _from_rank_zero(ranks, start)
        name = source.subset or source.layout
        jobs = default_prepare_jobs(len(scan.records), ranks) if num_jobs is None else num_jobs
        workers = f"{jobs} workers" + (" each" if ranks.size > 1 else "")
        parts = ([f"{ranks.size} ranks"] if ranks.size > 1 else []) + ([workers] if jobs > 1 else [])
        desc = f"prepare {name}" + (f" ({', '.join(parts)})" if parts else "")
        with tqdm(total=len(scan.records), desc=desc, unit="utt", disable=not progress or ranks.rank != 0) as bar:
            fd = None if lock is None else lock.fileno()
            labelled = _label_claimed(scan.records, folder, settings, jobs, ranks, f"prepare/{job}", bar, fd)
            shares = ranks.gather(labelled)
            bar.update(bar.total - bar.n)  # rank 0's bar ends at the job's total (the other ranks finished last)
        return _from_rank_zero(ranks, lambda: _write_folder(source, folder, settings, scan, shares))
    finally:
        if lock is not None:
            lock.release()


def _from_rank_zero(ranks: Ranks, make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its result on every rank; an error of rank 0's is raised on every rank (so that
    none waits for a rank that stopped), as itself where it can be sent, else as a :class:`PrepareError`."""
    if ranks.size == 1:
        return make()
    if ranks.rank != 0:
        ok, value = ranks.broadcast(None)
        if not ok:
            raise value
        return value
    try:
        value = make()
    except Exception as e:
        ranks.broadcast((False, _portable(e)))
        raise
    return ranks.broadcast((True, value))[1]


def _portable(error: Exception) -> Exception:
    """``error`` if it survives pickling (another rank raises it), else a :class:`PrepareError` with its text."""
    try:
        copy = pickle.loads(pickle.dumps(error))
    except Exception:
        copy = None
    if type(copy) is type(error) and str(copy) == str(error):
        return error
    return PrepareError(f"rank 0 stopped: {error}")


def _write_folder(
    source: CorpusSource, out: Path, settings: PrepareSettings, scan: SourceScan, shares: list[list[Labelled]]
) -> PreparedMeta:
    """The folder's files from every rank's labelled utterances (``shares``): the records in scan order, the
    skips (the scan's, then the labelling's), the pitch-bin edges over every voiced F0 value, the meta."""
    labelled = sorted((x for share in shares for x in share), key=lambda x: x[0])
    if [x[0] for x in labelled] != list(range(len(scan.records))):
        raise PrepareError(f"{out}: the ranks labelled {len(labelled)} of {len(scan.records)} utterances")
    records = sorted(((r, a) for _, kind, r, a in labelled if kind == "ok"), key=lambda x: x[0]["id"])
    skips = scan.skips + [r for _, kind, r, _ in labelled if kind == "skip"]
    if skips and settings.strict:
        first = skips[0]
        raise PrepareError(f"{first['file']}: {first['message']} (--strict; {len(skips)} problem(s) in all)")
    name = source.subset or source.layout
    if not records:
        unknown = sum(s["reason"] == "unknown-phone" for s in skips)
        hint = (
            f" ({unknown} of {len(skips)} use phone symbols outside ARPAbet: an alignment in another phone set, such "
            "as MFA's IPA english_mfa, needs --phone-map FILE)"
            if unknown > len(skips) / 2
            else ""
        )
        raise PrepareError(
            f"no usable utterances in {name}{hint}: " + "; ".join(f"{s['file']}: {s['message']}" for s in skips[:3])
        )
    if settings.edges is not None:
        edges = sorted(float(e) for e in settings.edges)
    else:
        edges = percentile_edges(np.concatenate([a["f0"] for _, a in records]), list(settings.quantiles))
    records, arrays = [r for r, _ in records], [a for _, a in records]
    if len(set(edges)) != len(edges):
        raise PrepareError(f"pitch bin edges must be distinct, got {edges}")
    unknown_gender = any(r["gender"] == UNKNOWN_GENDER for r in records)
    lacking = {k: v for k, v in scan.lacking.items() if k != "gender" or unknown_gender}

    meta = PreparedMeta(
        corpus=source.layout,
        root=str(source.root),
        subset=source.subset,
        alignments=None if source.alignments is None else str(source.alignments),
        geometry=settings.geometry.to_dict(),
        phones=list(PHONES),
        genders=list(GENDERS) + ([UNKNOWN_GENDER] if unknown_gender else []),
        phone_map=settings.phone_map.describe(),
        pitch=PitchMeta(
            method=settings.pitch,
            edges=edges,
            bins=bin_names(len(edges)),
            quantiles=None if settings.edges is not None else list(settings.quantiles),
            rule=settings.pitch_rule,
            step_seconds=settings.pitch_step,
            align=settings.pitch_align,
        ),
        frame_labels=settings.frame_labels,
        strict=settings.strict,
        num_utterances=len(records),
        num_frames=int(sum(r["num_frames"] for r in records)),
        hours=sum(r["num_samples"] for r in records) / settings.geometry.sample_rate / 3600,
        resampled=sum(r["resampled"] for r in records),
        skips=dict(Counter(s["reason"] for s in skips)),
        source_options=source.options(),
        lacking=lacking,
    )
    return PreparedCorpus.create(out, meta, records, skips, arrays).meta


def describe_prepared(meta: PreparedMeta, out: str | Path) -> str:
    """The summary `neurostat prepare` prints."""
    edges = ", ".join(f"{e:.2f} Hz" for e in meta.pitch.edges) or "given per frame"
    lines = [
        f"prepared {meta.num_utterances} utterances, {meta.hours:.3f} h, {meta.num_frames} frames -> {out}",
        f"frame geometry: {FrameGeometry.from_dict(meta.geometry).describe()}; frames labelled by "
        f"{meta.frame_labels}; pitch ({meta.pitch.method}, aligned by {meta.pitch.align}, rule {meta.pitch.rule}) "
        f"bin edges: {edges}",
    ]
    if meta.resampled:
        lines.append(f"resampled to {meta.geometry['sample_rate']} Hz: {meta.resampled} utterance(s)")
    if meta.skips:
        skips = ", ".join(f"{reason} {n}" for reason, n in sorted(meta.skips.items()))
        lines.append(f"skipped: {skips} (details: {Path(out) / 'skips.jsonl'})")
    lines += [f"lacking {what}: {why}" for what, why in meta.lacking.items()]
    return "\n".join(lines)
