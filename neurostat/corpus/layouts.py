"""Writing a corpus in each layout ``prepare`` reads: ``neurostat synth --layout`` and the cross-layout tests.

:func:`write_layout` rewrites a LibriSpeech-layout corpus with TextGrids (the demo corpus ``synth`` makes) as
LibriSpeech, TIMIT (SPHERE audio, ``.PHN`` sample offsets in TIMIT's lower-case symbols, ``h#`` and ``pau``
for silence), Lhotse manifests (one recording and supervision per utterance, the phones in
``alignment["phone"]``) or a CSV manifest with TextGrids.  The audio samples are the same in every layout; the
phone boundaries are rounded to whole samples in all four, as a ``.PHN`` file can hold nothing finer, so the
four prepare to the same labels.
"""

from __future__ import annotations

import csv
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from ..choices import LAYOUTS
from ..errors import OptionError
from .audio import span_samples, write_sphere
from .lhotseaudio import lhotse_module
from .librispeech import LibriSpeechSource, corpus_dir
from .source import UtteranceRecord
from .textgrid import Interval, read_textgrid, write_textgrid


@dataclass(frozen=True)
class WrittenCorpus:
    """A corpus as ``prepare`` takes it: layout, ``--root``, ``--subset`` and ``--alignments``."""

    layout: str
    root: Path
    subset: str | None = None
    alignments: Path | None = None

    def prepare_command(self, out: Path) -> str:
        """The ``neurostat prepare`` command that labels it into ``out``."""
        args = ["neurostat", "prepare"] + (["--corpus", self.layout] if self.layout != "librispeech" else [])
        args += ["--root", str(self.root)]
        args += ["--subset", self.subset] if self.subset else []
        args += ["--alignments", str(self.alignments)] if self.alignments else []
        return shlex.join([*args, "--out", str(out)])


def synthesize_layout(
    out: str | Path,
    layout: str = "librispeech",
    subset: str = "dev-clean",
    num_speakers: int | None = None,
    utterances_per_speaker: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> WrittenCorpus:
    """The demo corpus (:func:`~neurostat.corpus.synth.synthesize`, the same voices and sentences) in ``layout``:
    LibriSpeech exactly as ``synth`` always wrote it, another layout through :func:`write_layout`."""
    from .synth import DEMO_SPEAKERS, DEMO_UTTERANCES, synthesize

    if layout not in LAYOUTS:
        raise OptionError(f"unknown corpus layout {layout!r}; neurostat writes {', '.join(LAYOUTS)}")
    out = Path(out)
    sizes = (num_speakers or DEMO_SPEAKERS, utterances_per_speaker or DEMO_UTTERANCES)
    if layout == "librispeech":
        root, align = synthesize(out, subset, *sizes, seed, progress)
        return WrittenCorpus(layout, root, subset, align)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".synth-") as tmp:
        root, align = synthesize(Path(tmp), subset, *sizes, seed, progress)
        return write_layout(root, subset, align, layout, out)


def _sample_intervals(items: list[Interval], sample_rate: int) -> list[tuple[int, int, str]]:
    """A TextGrid tier's intervals with boundaries rounded to whole samples (empty ones dropped)."""
    spans = [(span_samples((iv.xmin, iv.xmax), sample_rate), iv.text) for iv in items]
    return [(first, first + n, text) for (first, n), text in spans if n > 0]


def _grid(path: Path, intervals: dict[str, list[tuple[int, int, str]]], num_samples: int, sample_rate: int) -> None:
    tiers = {
        name: [Interval(a / sample_rate, b / sample_rate, t) for a, b, t in items] for name, items in intervals.items()
    }
    write_textgrid(path, num_samples / sample_rate, tiers)


@dataclass(frozen=True)
class _Utterance:
    record: UtteranceRecord
    samples: np.ndarray  # int16
    sample_rate: int
    tiers: dict[str, list[tuple[int, int, str]]]  # phones (and words) in samples


def _read(root: Path, subset: str, alignments: Path) -> list[_Utterance]:
    scan = LibriSpeechSource(root, subset, alignments).scan()
    if scan.skips:
        first = scan.skips[0]
        raise OptionError(f"{first['file']}: {first['message']} (write_layout needs every utterance aligned)")
    out = []
    for r in scan.records:
        samples, sr = sf.read(r.audio.path, dtype="int16")
        tiers = {name: _sample_intervals(items, sr) for name, items in read_textgrid(r.phones.path).tiers.items()}
        out.append(_Utterance(r, samples, sr, tiers))
    return out


def write_layout(root: str | Path, subset: str, alignments: str | Path, layout: str, out: str | Path) -> WrittenCorpus:
    """Writes the LibriSpeech-layout corpus at ``root`` (``subset``, TextGrids in ``alignments``) into ``out`` in
    ``layout``, with the phone boundaries rounded to whole samples; returns where ``prepare`` finds it."""
    if layout not in LAYOUTS:
        raise OptionError(f"unknown corpus layout {layout!r}; neurostat writes {', '.join(LAYOUTS)}")
    utterances = _read(Path(root), subset, Path(alignments))
    out = Path(out)
    return {"librispeech": _librispeech, "timit": _timit, "lhotse": _lhotse, "manifest": _manifest}[layout](
        Path(root), subset, utterances, out
    )


def _librispeech(root: Path, subset: str, utterances: list[_Utterance], out: Path) -> WrittenCorpus:
    target, align = out / "LibriSpeech", out / "alignments"
    shutil.copytree(corpus_dir(root), target, dirs_exist_ok=True)
    for u in utterances:
        grid = align / subset / u.record.speaker / u.record.extra["chapter"] / f"{u.record.id}.TextGrid"
        grid.parent.mkdir(parents=True, exist_ok=True)
        _grid(grid, u.tiers, len(u.samples), u.sample_rate)
    return WrittenCorpus("librispeech", target, subset, align)


def _timit_speaker(record: UtteranceRecord, index: int) -> str:
    """A TIMIT speaker folder name: sex, three letters, a digit (``MABC0``)."""
    letters = "".join(chr(ord("A") + index // 26**k % 26) for k in (2, 1, 0))
    return f"{record.gender}{letters}0"


def _timit_symbol(symbol: str, first: bool, last: bool) -> str:
    if not symbol.strip():
        return "h#" if first or last else "pau"
    return symbol.rstrip("012").lower()


def _timit(root: Path, subset: str, utterances: list[_Utterance], out: Path) -> WrittenCorpus:
    target = out / "TIMIT"
    speakers = {s: i for i, s in enumerate(dict.fromkeys(u.record.speaker for u in utterances))}
    sentence: dict[str, int] = {}
    for u in utterances:
        name = _timit_speaker(u.record, speakers[u.record.speaker])
        folder = target / "TRAIN" / "DR1" / name
        folder.mkdir(parents=True, exist_ok=True)
        sentence[name] = sentence.get(name, 0) + 1
        stem = folder / f"SX{sentence[name]}"
        write_sphere(stem.with_suffix(".WAV"), u.samples, u.sample_rate)
        phones = u.tiers["phones"]
        lines = [f"{a} {b} {_timit_symbol(t, i == 0, i == len(phones) - 1)}" for i, (a, b, t) in enumerate(phones)]
        stem.with_suffix(".PHN").write_text("\n".join(lines) + "\n", encoding="ascii")
    return WrittenCorpus("timit", target)


def _lhotse(root: Path, subset: str, utterances: list[_Utterance], out: Path) -> WrittenCorpus:
    lhotse = lhotse_module()
    from lhotse.supervision import AlignmentItem

    target = out / "lhotse"
    (target / "audio").mkdir(parents=True, exist_ok=True)
    recordings, supervisions = [], []
    for u in utterances:
        audio = target / "audio" / f"{u.record.id}.flac"
        shutil.copyfile(u.record.audio.path, audio)
        recording = lhotse.Recording.from_file(audio.resolve(), recording_id=u.record.id)
        sr = u.sample_rate
        phones = [AlignmentItem(t or "sil", a / sr, (b - a) / sr) for a, b, t in u.tiers["phones"]]
        supervisions.append(
            lhotse.SupervisionSegment(
                id=u.record.id,
                recording_id=recording.id,
                start=0.0,
                duration=recording.duration,
                speaker=u.record.speaker,
                gender=u.record.gender,
                alignment={"phone": phones},
            )
        )
        recordings.append(recording)
    lhotse.RecordingSet.from_recordings(recordings).to_file(target / "recordings.jsonl.gz")
    lhotse.SupervisionSet.from_segments(supervisions).to_file(target / "supervisions.jsonl.gz")
    return WrittenCorpus("lhotse", target)


def _manifest(root: Path, subset: str, utterances: list[_Utterance], out: Path) -> WrittenCorpus:
    for folder in ("audio", "alignments"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for u in utterances:
        uid = u.record.id
        shutil.copyfile(u.record.audio.path, out / "audio" / f"{uid}.flac")
        _grid(out / "alignments" / f"{uid}.TextGrid", u.tiers, len(u.samples), u.sample_rate)
        rows.append([uid, f"audio/{uid}.flac", u.record.speaker, u.record.gender, f"alignments/{uid}.TextGrid"])
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["id", "audio", "speaker", "gender", "textgrid"], *rows])
    return WrittenCorpus("manifest", out / "manifest.csv")
