"""The LibriSpeech directory layout: ``<root>/<subset>/<speaker>/<chapter>/<spk>-<chap>-<utt>.flac``.

``root`` may be the ``LibriSpeech`` folder itself or the folder holding it.  ``SPEAKERS.TXT`` sits
in the ``LibriSpeech`` folder.  Alignments (MFA TextGrids) may mirror the corpus layout, with or
without the subset folder, or lie flat: they are found by utterance id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError
from .audio import skip_record
from .source import (
    AudioRef,
    CorpusError,
    CorpusSource,
    PhoneSource,
    SourceScan,
    UtteranceRecord,
)
from .speakers import read_speakers


@dataclass(frozen=True)
class CorpusUtterance:
    id: str
    speaker: str
    chapter: str
    audio: Path


def corpus_dir(root: str | Path) -> Path:
    """The folder that holds the subsets and SPEAKERS.TXT."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus root {root} does not exist or is not a directory")
    return root / "LibriSpeech" if (root / "LibriSpeech").is_dir() else root


def subset_dir(root: str | Path, subset: str) -> Path:
    base = corpus_dir(root)
    path = base / subset
    if not path.is_dir():
        have = sorted(p.name for p in base.iterdir() if p.is_dir())
        raise CorpusError(f"subset {subset!r} not found in {base} (found: {', '.join(have) or 'nothing'})")
    return path


def scan(root: str | Path, subset: str) -> list[CorpusUtterance]:
    """All FLAC utterances of a subset, sorted by id; duplicate ids are an error."""
    sub = subset_dir(root, subset)
    found: dict[str, CorpusUtterance] = {}
    for chapter_dir in sorted(p for p in sub.glob("*/*") if p.is_dir()):
        for flac in sorted(chapter_dir.glob("*.flac")):
            uid = flac.stem
            if uid in found:
                raise CorpusError(f"duplicate utterance id {uid}: {found[uid].audio} and {flac}")
            found[uid] = CorpusUtterance(uid, chapter_dir.parent.name, chapter_dir.name, flac)
    if not found:
        raise CorpusError(f"no .flac files under {sub}")
    return [found[k] for k in sorted(found)]


def index_alignments(align_dir: str | Path, subset: str | None = None) -> dict[str, Path]:
    """Maps utterance id -> TextGrid path under ``align_dir`` (any depth); duplicates are an error."""
    base = Path(align_dir)
    if not base.is_dir():
        raise CorpusError(f"alignments directory {base} does not exist")
    if subset and (base / subset).is_dir():
        base = base / subset
    out: dict[str, Path] = {}
    for tg in sorted(base.rglob("*")):
        if tg.suffix.lower() != ".textgrid" or not tg.is_file():
            continue
        if tg.stem in out:
            raise CorpusError(f"two TextGrids for utterance {tg.stem}: {out[tg.stem]} and {tg}")
        out[tg.stem] = tg
    return out


class LibriSpeechSource(CorpusSource):
    """``--corpus librispeech``: a subset's FLAC files, genders from SPEAKERS.TXT, MFA TextGrids by utterance id."""

    layout = "librispeech"

    def __init__(self, root, subset=None, alignments=None):
        if subset is None or alignments is None:
            raise OptionError(
                "--subset and --alignments (or --paper-labels) are required to label a LibriSpeech corpus"
            )
        super().__init__(root, subset, alignments)

    def inputs(self) -> tuple[Path, ...]:
        return (subset_dir(self.root, self.subset), self.alignments)

    def default_out(self) -> Path:
        return self.alignments.parent / f"prepared-{self.subset}"

    def scan(self) -> SourceScan:
        utterances = scan(self.root, self.subset)
        speakers = read_speakers(corpus_dir(self.root) / "SPEAKERS.TXT")
        grids = index_alignments(self.alignments, self.subset)
        records, skips = [], []
        for u in utterances:
            if u.speaker not in speakers:
                message = f"speaker {u.speaker} is not in SPEAKERS.TXT"
                skips.append(skip_record(u.id, "unknown-speaker", u.audio, message))
                continue
            if u.id not in grids:
                message = "no TextGrid for this utterance in the alignments directory"
                skips.append(skip_record(u.id, "missing-textgrid", u.audio, message))
                continue
            audio, phones = AudioRef(str(u.audio)), PhoneSource("textgrid", str(grids[u.id]))
            records.append(
                UtteranceRecord(u.id, u.speaker, speakers[u.speaker].sex, audio, phones, {"chapter": u.chapter})
            )
        return SourceScan(records, skips)
