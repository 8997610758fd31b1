"""Phone vocabulary: the 39 ARPAbet phones of the paper, silence and spoken noise, and symbol mapping.

MFA's ARPAbet output carries stress digits on vowels (``AH0``, ``IY1``); the paper merges them, so
the default mapping strips a trailing 0/1/2.  Other phone sets (e.g. MFA's IPA ``english_mfa``)
need a mapping file: a JSON object or a two-column TSV ``symbol<TAB>target``.  A symbol that the
mapping does not know is an error, never a silent label.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

VOWELS = ("IY", "IH", "EH", "AE", "AA", "AH", "AO", "UH", "EY", "AY", "OY", "AW", "OW", "ER", "UW")
VOICED_CONSONANTS = ("B", "D", "G", "JH", "DH", "Z", "ZH", "V", "M", "N", "NG", "L", "R", "W", "Y")
UNVOICED_CONSONANTS = ("P", "T", "K", "CH", "TH", "S", "SH", "F", "HH")
SILENCE = "sil"
SPOKEN_NOISE = "spn"
ARPABET = VOWELS + VOICED_CONSONANTS + UNVOICED_CONSONANTS
PHONES = ARPABET + (SILENCE, SPOKEN_NOISE)
BROAD_CLASSES = {
    "vowel": VOWELS,
    "voiced-consonant": VOICED_CONSONANTS,
    "unvoiced-consonant": UNVOICED_CONSONANTS,
}
NON_SPEECH = (SILENCE, SPOKEN_NOISE)

_SILENCE_SYMBOLS = {"", "sil", "sp", "<eps>", "SIL", "SP"}
_NOISE_SYMBOLS = {"spn", "SPN", "<unk>", "<UNK>"}
_STRESS = re.compile(r"^([A-Za-z]+)[012]$")


class UnknownPhoneError(ValueError):
    """A phone symbol that the mapping cannot place."""


class PhoneMap:
    """Maps corpus phone symbols to the vocabulary ``PHONES``.

    ``extra`` entries (from a mapping file) take precedence over the default ARPAbet rule.
    """

    def __init__(self, extra: dict[str, str] | None = None, source: str = "arpabet-stress-merge"):
        self.extra = dict(extra or {})
        self.source = source
        for symbol, target in self.extra.items():
            if target not in PHONES:
                raise ValueError(f"mapping {source}: {symbol!r} maps to {target!r}, which is not one of {PHONES}")

    @classmethod
    def from_file(cls, path: str | Path) -> "PhoneMap":
        """Reads a JSON object or a TSV of ``symbol<TAB>target`` lines (``#`` comments allowed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"phone mapping file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            table = json.loads(text)
            if not isinstance(table, dict):
                raise ValueError(f"{path}: a JSON phone mapping must be an object symbol -> phone")
        else:
            table = {}
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{path}:{n}: expected 'symbol<TAB>phone', got {line!r}")
                table[parts[0].strip()] = parts[1].strip()
        return cls(table, source=str(path))

    def __call__(self, symbol: str) -> str:
        symbol = symbol.strip()
        if symbol in self.extra:
            return self.extra[symbol]
        if symbol in _SILENCE_SYMBOLS:
            return SILENCE
        if symbol in _NOISE_SYMBOLS:
            return SPOKEN_NOISE
        m = _STRESS.match(symbol)
        base = (m.group(1) if m else symbol).upper()
        if base in ARPABET:
            return base
        raise UnknownPhoneError(f"unknown phone symbol {symbol!r} (mapping: {self.source})")

    def describe(self) -> dict:
        """What the store and the prepared corpus record about the mapping."""
        return {"source": self.source, "extra": self.extra}
