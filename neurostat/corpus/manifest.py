"""A plain manifest of utterances: a CSV file with a header row, or a JSON-lines file of objects.

Columns ``id``, ``audio``, ``speaker``; optional ``gender`` (M/F, male/female; empty: unknown), ``textgrid``
(an MFA-style TextGrid with a ``phones`` tier; without one the ``--alignments`` folder is searched by id),
``start`` and ``end`` (seconds: the utterance is that span of the audio file, and the TextGrid's times are
on the file's timeline).  Relative paths are relative to the manifest's folder; other columns are ignored.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import OptionError
from .librispeech import index_alignments
from .audio import skip_record
from .source import (
    AudioRef,
    CorpusError,
    CorpusSource,
    PhoneSource,
    SourceScan,
    UtteranceRecord,
    check_unique,
    gender_of,
    lacking_gender,
)

REQUIRED = ("id", "audio", "speaker")
OPTIONAL = ("gender", "textgrid", "start", "end")


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) of each utterance row of a ``.csv`` or ``.jsonl`` manifest, ``where`` = ``file:line``;
    values as strings (None where absent)."""
    if not path.is_file():
        raise CorpusError(f"manifest {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    rows = []
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None:
                    raise CorpusError(f"{path}: empty manifest (expected a header row: {', '.join(REQUIRED)}, ...)")
                reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
                _check_columns(path, reader.fieldnames)
                for row in reader:
                    rows.append((f"{path}:{reader.line_num}", {k: _text(v) for k, v in row.items() if k is not None}))
        elif suffix in (".jsonl", ".json"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise CorpusError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                row = {str(k).strip().lower(): _text(v) for k, v in row.items()}
                _check_columns(f"{path}:{n}", row)
                rows.append((f"{path}:{n}", row))
        else:
            raise CorpusError(f"manifest {path}: expected a .csv or .jsonl file")
    except (UnicodeDecodeError, csv.Error, ValueError) as e:
        if isinstance(e, CorpusError):
            raise
        raise CorpusError(f"{path}: cannot read the manifest ({e})") from None
    if not rows:
        raise CorpusError(f"manifest {path} has no utterance rows")
    return rows


def _text(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _check_columns(where, columns) -> None:
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise CorpusError(
            f"{where}: no {', '.join(missing)} column (a manifest has {', '.join(REQUIRED)}, optional "
            f"{', '.join(OPTIONAL)})"
        )


def _span(where: str, row: dict) -> tuple[float, float] | None:
    start, end = row.get("start"), row.get("end")
    if start is None and end is None:
        return None
    try:
        span = float(start if start is not None else "nan"), float(end if end is not None else "nan")
    except ValueError:
        raise CorpusError(f"{where}: start {start!r} and end {end!r} must be numbers of seconds") from None
    if not (0 <= span[0] < span[1]):
        raise CorpusError(f"{where}: a segment needs 0 <= start < end (seconds), got start {start}, end {end}")
    return span


class ManifestSource(CorpusSource):
    """``--corpus manifest``: ``--root FILE.csv|FILE.jsonl``, one utterance a row."""

    layout = "manifest"

    def __init__(self, root, subset=None, alignments=None):
        if subset is not None:
            raise OptionError("a manifest has no subsets: leave out --subset (write one manifest per subset)")
        super().__init__(root, None, alignments)

    def scan(self) -> SourceScan:
        rows = read_rows(self.root)
        grids = index_alignments(self.alignments) if self.alignments is not None else {}
        has_grids = self.alignments is not None or any(row.get("textgrid") for _, row in rows)
        if not has_grids:
            raise CorpusError(
                f"{self.root}: no textgrid column and no --alignments folder: neurostat needs a phone alignment"
            )
        folder, first = self.root.parent, {}
        records, skips, genders = [], [], []
        for where, row in rows:
            empty = [c for c in REQUIRED if not row.get(c)]
            if empty:
                raise CorpusError(f"{where}: empty {', '.join(empty)}")
            uid, span = row["id"], _span(where, row)
            if uid in first:
                raise CorpusError(f"{where}: duplicate utterance id {uid} (first at {first[uid]})")
            first[uid] = where
            audio = (folder / row["audio"]).resolve()
            if not audio.is_file():
                message = f"{where}: no such audio file"
                skips.append(skip_record(uid, "missing-audio", audio, message))
                continue
            grid = (folder / row["textgrid"]).resolve() if row.get("textgrid") else grids.get(uid)
            if grid is None or not grid.is_file():
                message = f"{where}: " + (f"no TextGrid {grid}" if grid else "no textgrid and none in --alignments")
                skips.append(skip_record(uid, "missing-textgrid", grid or audio, message))
                continue
            ref = AudioRef(str(audio)) if span is None else AudioRef(str(audio), *span)
            genders.append(row.get("gender"))
            phones = PhoneSource("textgrid", str(grid))
            records.append(UtteranceRecord(uid, row["speaker"], gender_of(row.get("gender")), ref, phones))
        column = any("gender" in row for _, row in rows)
        why = "their rows' gender is empty or not M/F" if column else "no gender column"
        return SourceScan(check_unique(records, str(self.root)), skips, lacking_gender(records, genders, why))
