"""LibriSpeech ``SPEAKERS.TXT``: speaker id → sex, subset, minutes, name.

Lines starting with ``;`` are comments; fields are ``ID | SEX | SUBSET | MINUTES | NAME``,
separated by ``|`` with free spacing.  Names may themselves contain ``|`` in the wild, so the line
is split at most four times.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GENDERS = ("M", "F")


@dataclass(frozen=True)
class Speaker:
    id: str
    sex: str
    subset: str
    minutes: float
    name: str


class SpeakersError(ValueError):
    """SPEAKERS.TXT cannot be read; the message names the file and line."""


def read_speakers(path: str | Path) -> dict[str, Speaker]:
    """Parses SPEAKERS.TXT; a malformed line raises SpeakersError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise SpeakersError(f"{path}: SPEAKERS.TXT not found (needed for speaker gender)")
    speakers: dict[str, Speaker] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        parts = [p.strip() for p in line.split("|", 4)]
        if len(parts) < 4:
            raise SpeakersError(f"{path}:{n}: expected 'ID | SEX | SUBSET | MINUTES | NAME', got {line!r}")
        sid, sex, subset, minutes = parts[:4]
        sex = sex.upper()
        if sex not in GENDERS:
            raise SpeakersError(f"{path}:{n}: speaker {sid}: sex must be M or F, got {sex!r}")
        try:
            mins = float(minutes)
        except ValueError:
            raise SpeakersError(f"{path}:{n}: speaker {sid}: minutes {minutes!r} is not a number") from None
        if sid in speakers and speakers[sid].sex != sex:
            raise SpeakersError(f"{path}:{n}: speaker {sid} listed twice with different sex")
        speakers[sid] = Speaker(sid, sex, subset, mins, parts[4] if len(parts) > 4 else "")
    return speakers
