"""``neurostat prepare``: labels of a LibriSpeech-layout corpus, written as a prepared-corpus folder
(its layout: :mod:`neurostat.corpus.prepared`).

Per-utterance files carry a key of their inputs (file sizes/mtimes, settings), so a second run
reuses what is done and redoes only what changed.  Label sets attached earlier are kept.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..choices import FRAME_LABELS, LAYOUTS, PITCH_ALIGNS, PITCH_METHODS, PITCH_RULES
from ..errors import UserError
from ..files import check_out_folder
from ..frames import FrameGeometry
from ..phones import PHONES, PhoneMap, UnknownPhoneError
from .audio import Skip, load_audio
from .librispeech import corpus_dir, index_alignments, scan, subset_dir
from .pitch import bin_names, f0_at, percentile_edges
from .prepared import CACHE_FORMAT, PitchMeta, PreparedCorpus, PreparedMeta, is_prepared
from .speakers import GENDERS, read_speakers
from .textgrid import TextGridError, read_textgrid


class PrepareError(UserError, RuntimeError):
    """Prepare cannot go on (``--strict`` turns every skip into one)."""


@dataclass
class PrepareSettings:
    geometry: FrameGeometry
    pitch: str = "praat"
    quantiles: tuple[float, ...] = (1 / 3, 2 / 3)
    edges: tuple[float, ...] | None = None
    phone_map: PhoneMap = field(default_factory=PhoneMap)
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
        ``"129.03,179.78"``); ``phone_map`` a JSON/TSV file."""
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
            phone_map=PhoneMap.from_file(phone_map) if phone_map else PhoneMap(),
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
            "phone_map": self.phone_map.describe(),
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


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _utt_key(utt: dict, audio: Path, textgrid: Path, settings: PrepareSettings) -> str:
    """The key of everything a record depends on: the utterance's metadata (speaker, gender from
    SPEAKERS.TXT, paths), the audio and TextGrid files (size, mtime) and the settings."""
    blob = json.dumps([utt, _stat(audio), _stat(textgrid), settings.key()], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _phone_intervals(textgrid: Path, phone_map: PhoneMap, duration: float, frame: float):
    grid = read_textgrid(textgrid)
    tiers = {name.lower(): items for name, items in grid.tiers.items()}
    if "phones" not in tiers:
        raise Skip("no-phones-tier", textgrid, f"no 'phones' tier (tiers: {', '.join(grid.tiers) or 'none'})")
    items = tiers["phones"]
    if not items:
        raise Skip("no-phones-tier", textgrid, "the 'phones' tier is empty")
    end = items[-1].xmax
    if abs(end - duration) > frame:
        side = "before" if end < duration else "after"
        raise Skip(
            "length-mismatch",
            textgrid,
            f"alignment ends at {end:.3f} s, {abs(end - duration):.3f} s {side} the audio ({duration:.3f} s); more than one frame ({frame:.3f} s)",
        )
    try:
        ids = np.array([PHONES.index(phone_map(iv.text)) for iv in items], dtype=np.int16)
    except UnknownPhoneError as e:
        raise Skip("unknown-phone", textgrid, str(e)) from None
    starts = np.array([iv.xmin for iv in items], dtype=np.float64)
    ends = np.array([iv.xmax for iv in items], dtype=np.float64)
    keep = ends > starts
    return starts[keep], ends[keep], ids[keep]


def _prepare_one(task: tuple) -> tuple[str, dict]:
    """Labels one utterance; returns ("ok", record) or ("skip", skip record)."""
    utt, textgrid, out_dir, settings = task
    audio = Path(utt["audio"])
    try:
        if textgrid is None:
            raise Skip("missing-textgrid", audio, "no TextGrid for this utterance in the alignments directory")
        textgrid = Path(textgrid)
        key = _utt_key(utt, audio, textgrid, settings)
        cached = PreparedCorpus.cached_record(out_dir, utt["id"], key)
        if cached is not None and "audio_sha1" in cached:  # records from before audio digests are redone
            return "ok", cached
        geo = settings.geometry
        wave, source_rate, audio_sha1 = load_audio(audio, geo.sample_rate, strict=settings.strict)
        n_frames = geo.num_frames(len(wave))
        if n_frames == 0:
            raise Skip(
                "too-short", audio, f"{len(wave)} samples is shorter than one frame ({geo.receptive_field} samples)"
            )
        starts, ends, ids = _phone_intervals(
            textgrid, settings.phone_map, len(wave) / geo.sample_rate, geo.stride / geo.sample_rate
        )
        centres, cells = geo.centres(n_frames), len(wave) // geo.stride  # cells: the official int(duration·50)
        f0 = f0_at(settings.pitch, wave, geo.sample_rate, centres, settings.pitch_step, settings.pitch_align, cells)
    except TextGridError as e:
        return "skip", {"id": utt["id"], "reason": "bad-textgrid", "file": str(textgrid), "message": str(e)}
    except Skip as s:
        return "skip", {"id": utt["id"], "reason": s.reason, "file": s.path, "message": s.message}
    record = {
        **utt,
        "textgrid": str(textgrid),
        "num_samples": len(wave),
        "num_frames": n_frames,
        "source_sample_rate": source_rate,
        "resampled": source_rate != geo.sample_rate,
        "audio_sha1": audio_sha1,
    }
    PreparedCorpus.write_utterance(out_dir, record, key, starts=starts, ends=ends, phone=ids, f0=f0.astype(np.float32))
    return "ok", record


def default_prepared_dir(alignments: str | Path, subset: str) -> Path:
    """Where a prepared corpus goes when no folder is given: ``<alignments>/../prepared-<subset>``."""
    return Path(alignments).parent / f"prepared-{subset}"


def prepare(
    root: str | Path,
    subset: str,
    alignments: str | Path,
    out: str | Path | None,
    settings: PrepareSettings,
    num_jobs: int = 1,
    progress: bool = True,
    layout: str = "librispeech",
) -> PreparedMeta:
    """Prepares ``subset`` of the corpus at ``root`` (in the ``layout`` of :data:`LAYOUTS`) into ``out``
    (default: :func:`default_prepared_dir`); returns its :class:`PreparedMeta`."""
    if layout not in LAYOUTS:
        raise PrepareError(f"unknown corpus layout {layout!r}; neurostat reads {', '.join(LAYOUTS)}")
    out = default_prepared_dir(alignments, subset) if out is None else out
    root, alignments = Path(root).resolve(), Path(alignments).resolve()  # absolute paths in the records
    if settings.pitch not in PITCH_METHODS:
        raise PrepareError(f"unknown pitch method {settings.pitch!r}; choose one of {PITCH_METHODS}")
    out = check_out_folder(out, "prepared corpus", is_prepared, (subset_dir(root, subset), alignments))
    utterances = scan(root, subset)
    speakers = read_speakers(corpus_dir(root) / "SPEAKERS.TXT")
    grids = index_alignments(alignments, subset)
    out.mkdir(parents=True, exist_ok=True)

    tasks, skips = [], []
    for u in utterances:
        if u.speaker not in speakers:
            skips.append(
                {
                    "id": u.id,
                    "reason": "unknown-speaker",
                    "file": str(u.audio),
                    "message": f"speaker {u.speaker} is not in SPEAKERS.TXT",
                }
            )
            continue
        utt = {
            "id": u.id,
            "speaker": u.speaker,
            "chapter": u.chapter,
            "gender": speakers[u.speaker].sex,
            "audio": str(u.audio),
        }
        tasks.append((utt, str(grids[u.id]) if u.id in grids else None, str(out), settings))

    records = []
    bar = tqdm(total=len(tasks), desc=f"prepare {subset}", unit="utt", disable=not progress)
    if num_jobs > 1:
        with ProcessPoolExecutor(max_workers=num_jobs) as pool:
            results = pool.map(_prepare_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * num_jobs))))
            for kind, rec in results:
                (records if kind == "ok" else skips).append(rec)
                bar.update()
    else:
        for task in tasks:
            kind, rec = _prepare_one(task)
            (records if kind == "ok" else skips).append(rec)
            bar.update()
    bar.close()
    if skips and settings.strict:
        first = skips[0]
        raise PrepareError(f"{first['file']}: {first['message']} (--strict; {len(skips)} problem(s) in all)")
    if not records:
        unknown = sum(s["reason"] == "unknown-phone" for s in skips)
        hint = (
            f" ({unknown} of {len(skips)} use phone symbols outside ARPAbet: an alignment in another phone set, such "
            "as MFA's IPA english_mfa, needs --phone-map FILE)"
            if unknown > len(skips) / 2
            else ""
        )
        raise PrepareError(
            f"no usable utterances in {subset}{hint}: " + "; ".join(f"{s['file']}: {s['message']}" for s in skips[:3])
        )

    records.sort(key=lambda r: r["id"])
    if settings.edges is not None:
        edges = sorted(float(e) for e in settings.edges)
    else:
        f0 = np.concatenate([PreparedCorpus.read_f0(out, r["id"]) for r in records])
        edges = percentile_edges(f0, list(settings.quantiles))
    if len(set(edges)) != len(edges):
        raise PrepareError(f"pitch bin edges must be distinct, got {edges}")

    meta = PreparedMeta(
        corpus=layout,
        root=str(Path(root).resolve()),
        subset=subset,
        alignments=str(Path(alignments).resolve()),
        geometry=settings.geometry.to_dict(),
        phones=list(PHONES),
        genders=list(GENDERS),
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
    )
    return PreparedCorpus.create(out, meta, records, skips).meta


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
    return "\n".join(lines)
