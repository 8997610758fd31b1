"""Edits a synthetic corpus the way a user would (a corrected SPEAKERS.TXT)."""

from pathlib import Path


def flip_sex(root: Path, speaker: str) -> str:
    """Flips ``speaker``'s sex in ``root/LibriSpeech/SPEAKERS.TXT``; returns the new one."""
    speakers = root / "LibriSpeech" / "SPEAKERS.TXT"
    lines, flipped = [], None
    for line in speakers.read_text().splitlines():
        fields = line.split("|")
        if not line.startswith(";") and fields[0].strip() == speaker:
            flipped = {"M": "F", "F": "M"}[fields[1].strip()]
            fields[1] = f" {flipped} "
        lines.append("|".join(fields))
    speakers.write_text("\n".join(lines) + "\n")
    assert flipped is not None, f"speaker {speaker} is not in {speakers}"
    return flipped
