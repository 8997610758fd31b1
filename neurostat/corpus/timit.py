"""The TIMIT layout (LDC93S1): ``<root>/<TRAIN|TEST>/DR<n>/<M|F><initials><digit>/<sentence>.WAV`` in NIST
SPHERE, each with a ``.PHN`` file of hand-corrected phone boundaries in samples; upper- or lower-case names.

The speaker's sex is the first letter of its folder.  Utterance ids are ``<SPEAKER>_<SENTENCE>`` (``FCJF0_SA1``).
TIMIT's 61 symbols map to neurostat's phones by the shipped ``neurostat/data/timit_phones.tsv`` (README:
"Your own corpus").  The two SA sentences, which every speaker reads, are kept unless ``sa=False``
(``--no-sa``); most of the literature (Lee & Hon 1989 and the recipes after it) leaves them out.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np

from ..phones import PhoneMap
from .audio import Skip, skip_record
from .source import (
    AudioRef,
    CorpusError,
    CorpusSource,
    PhoneSource,
    SourceScan,
    UtteranceRecord,
    check_unique,
)

PARTS = ("TRAIN", "TEST")
_SPEAKER = re.compile(r"^([MF])[A-Z]{3}\d$")
_SENTENCE = re.compile(r"^S[AIX]\d+$")
MAP_FILE = "data/timit_phones.tsv"
MAP_SOURCE = f"neurostat/{MAP_FILE}"
"""How a prepared corpus and a store name the shipped map (its ``phone_map`` record's ``source``)."""


def timit_phone_map() -> PhoneMap:
    """The shipped map of TIMIT's 61 symbols (``neurostat/data/timit_phones.tsv``)."""
    with resources.as_file(resources.files("neurostat").joinpath(MAP_FILE)) as path:
        table = PhoneMap.from_file(path).extra
    return PhoneMap(table, source=MAP_SOURCE)


def read_phn(path: str | Path) -> list[tuple[int, int, str]]:
    """(start sample, end sample, symbol) of each line of a ``.PHN`` file; a malformed or unsorted file is a Skip."""
    items: list[tuple[int, int, str]] = []
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise Skip("bad-phn", path, f"cannot read the .PHN file ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            raise Skip("bad-phn", path, f"line {n}: expected '<start sample> <end sample> <phone>', got {line!r}")
        start, end = int(parts[0]), int(parts[1])
        if end < start or (items and start < items[-1][1]):
            raise Skip("bad-phn", path, f"line {n}: {line.strip()!r} ends before it starts or overlaps the line before")
        items.append((start, end, parts[2]))
    if not items:
        raise Skip("bad-phn", path, "the .PHN file is empty")
    return items


def phn_intervals(path: str | Path, sample_rate: int, num_samples: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(start s, end s, symbols) of a ``.PHN`` file of audio with ``num_samples`` samples at ``sample_rate``:
    boundaries that run past the audio are a Skip naming how far."""
    items = read_phn(path)
    last = items[-1][1]
    if last > num_samples:
        raise Skip(
            "length-mismatch",
            path,
            f"phones run to sample {last}, {last - num_samples} past the audio's {num_samples} samples",
        )
    samples = np.array([(a, b) for a, b, _ in items], dtype=np.float64)
    return samples[:, 0] / sample_rate, samples[:, 1] / sample_rate, [s for _, _, s in items]


def _child(folder: Path, name: str) -> Path | None:
    """``folder``'s child called ``name`` in any case."""
    return next((p for p in sorted(folder.iterdir()) if p.is_dir() and p.name.upper() == name), None)


def timit_dir(root: Path) -> Path:
    """The folder that holds TRAIN and TEST: ``root`` or its one sub-folder that does (``TIMIT/``, ``data/``)."""
    if not root.is_dir():
        raise CorpusError(f"TIMIT root {root} does not exist or is not a directory")
    for folder in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        if any(_child(folder, part) for part in PARTS):
            return folder
    raise CorpusError(f"no TRAIN or TEST folder in {root} or its sub-folders: not the TIMIT layout")


class TimitSource(CorpusSource):
    """``--corpus timit``: SPHERE audio, ``.PHN`` phones, sex from the speaker folder (``--no-sa``: no SA sentences)."""

    layout = "timit"
    own_options = ("sa",)

    def __init__(self, root, subset=None, alignments=None, sa: bool = True):
        if subset is not None and subset.upper() not in PARTS:
            raise CorpusError(f"TIMIT subset {subset!r}: choose TRAIN or TEST (or none for both)")
        if alignments is not None:
            raise CorpusError("TIMIT brings its own phone alignments (.PHN files): leave out --alignments")
        super().__init__(root, None if subset is None else subset.upper(), None)
        self.sa = sa

    def options(self) -> dict:
        return {} if self.sa else {"sa": False}

    def phone_map(self, given: PhoneMap | None = None) -> PhoneMap:
        base = timit_phone_map()
        if given is None:
            return base
        return PhoneMap({**base.extra, **given.extra}, source=f"{base.source} + {given.source}")

    def scan(self) -> SourceScan:
        base = timit_dir(self.root)
        parts = [p for p in (_child(base, part) for part in ([self.subset] if self.subset else PARTS)) if p]
        if not parts:
            raise CorpusError(f"no {self.subset} folder in {base}")
        records, skips = [], []
        for part in parts:
            for speaker_dir in sorted(p for p in part.glob("*/*") if p.is_dir()):
                speaker = speaker_dir.name.upper()
                sex = _SPEAKER.match(speaker)
                if sex is None:
                    raise CorpusError(
                        f"{speaker_dir}: a TIMIT speaker folder is <M|F><3 initials><digit> (e.g. FCJF0); "
                        "its first letter gives the speaker's sex"
                    )
                for wav in sorted(speaker_dir.iterdir()):
                    sentence = wav.stem.upper()
                    if wav.suffix.upper() != ".WAV" or not _SENTENCE.match(sentence):
                        continue
                    if not self.sa and sentence.startswith("SA"):
                        continue
                    uid = f"{speaker}_{sentence}"
                    phn = next((p for p in (wav.with_suffix(".PHN"), wav.with_suffix(".phn")) if p.is_file()), None)
                    if phn is None:
                        skips.append(skip_record(uid, "missing-phn", wav, "no .PHN file beside the audio"))
                        continue
                    extra = {"part": part.name.upper(), "dialect": speaker_dir.parent.name.upper()}
                    audio, phones = AudioRef(str(wav)), PhoneSource("phn", str(phn))
                    records.append(UtteranceRecord(uid, speaker, sex.group(1), audio, phones, extra))
        if not records and not skips:
            raise CorpusError(f"no TIMIT sentences (<speaker>/S[AIX]<n>.WAV) under {', '.join(map(str, parts))}")
        return SourceScan(check_unique(records, "TIMIT"), skips)
