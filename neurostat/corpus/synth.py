"""The embedded demo corpus: synthetic English speech from espeak-ng with exact phone timings.

espeak-ng (bundled by the ``espeakng-loader`` wheel) is driven through ctypes.  Its phoneme events
give each phone's start sample, so the MFA-style TextGrids written beside the audio are exact, not
forced-aligned.  Speakers alternate male/female voices with varied pitch, range and rate; all
choices come from one seeded generator, so a given ``seed`` gives the same corpus.  The output uses
the LibriSpeech layout, so ``prepare`` reads it like the real corpus.

espeak-ng's voice variants are split in two: the demo corpus speaks with ``DEMO_VARIANTS`` and the
shipped demo model (``neurostat.tiny``) was trained on ``TRAINING_VARIANTS`` only, so the default
run measures the model on voices it never heard.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import random
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from tqdm import tqdm

from ..phones import VOWELS
from .speakers import read_speakers
from .textgrid import Interval, write_textgrid

SAMPLE_RATE = 16000
_PAUSES = {"_", "_:", "_!", "_|", "_^_", ";"}
_ESPEAK_TO_ARPABET = {
    "0": "AA",
    "3": "ER",
    "3:": "ER",
    "@": "AH",
    "@L": "L",
    "A:": "AA",
    "A@": "AA",
    "D": "DH",
    "E": "EH",
    "I": "IH",
    "I#": "IH",
    "N": "NG",
    "O": "AO",
    "O:": "AO",
    "O@": "AO",
    "OI": "OY",
    "S": "SH",
    "T": "TH",
    "U": "UH",
    "U@": "UH",
    "V": "AH",
    "Z": "ZH",
    "a": "AE",
    "a#": "AH",
    "aa": "AE",
    "aI": "AY",
    "aI@": "AY",
    "aI3": "AY",
    "aU": "AW",
    "aU@": "AW",
    "e@": "EH",
    "eI": "EY",
    "i": "IY",
    "i:": "IY",
    "i@": "IY",
    "i@3": "IY",
    "o@": "AO",
    "oU": "OW",
    "u:": "UW",
    "r": "R",
    "r-": "R",
    "j": "Y",
    "h": "HH",
    "tS": "CH",
    "dZ": "JH",
    "t#": "T",
    "d#": "D",
    "n-": "N",
    "l-": "L",
    "m-": "M",
    "?": "T",
    "x": "K",
    "W": "W",
    **{c: c.upper() for c in "bdfgklmnpstvwz"},
}


def espeak_to_arpabet(name: str) -> str:
    """ARPAbet (with a stress digit on vowels) for an espeak-ng phoneme mnemonic; '' for pauses."""
    stress = {"'": "1", ",": "2"}.get(name[:1], "0")
    base = name.lstrip("',")
    if base in _PAUSES:
        return ""
    phone = _ESPEAK_TO_ARPABET.get(base) or _ESPEAK_TO_ARPABET.get(base.rstrip("0123456789"), "spn")
    return phone + stress if phone in VOWELS else phone


class _Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _Id),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_EV_WORD, _EV_PHONEME = 1, 7
_LIBC = ctypes.CDLL(None)


class Espeak:
    """Process-global espeak-ng in synchronous mode with phoneme events (not thread-safe)."""

    _instance: "Espeak | None" = None

    def __init__(self):
        import espeakng_loader

        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.rate = self.lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 1)
        if self.rate <= 0:
            raise RuntimeError("espeak-ng failed to initialise")
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple] = []
        self._cb = _CALLBACK(self._collect)
        self.lib.espeak_SetSynthCallback(self._cb)

    @classmethod
    def get(cls) -> "Espeak":
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != 0:
            e = events[i]
            if e.type == _EV_PHONEME:
                self._events.append((_EV_PHONEME, e.sample, e.id.string.decode("ascii", "replace")))
            elif e.type == _EV_WORD:
                self._events.append((_EV_WORD, e.sample, (e.text_position, e.length)))
            i += 1
        return 0

    def say(
        self, text: str, voice: str, pitch: int, pitch_range: int, rate: int, seed: int
    ) -> tuple[np.ndarray, list[tuple]]:
        """int16 samples at ``self.rate`` and the (type, sample, payload) events.

        Voice variants add random noise from espeak's own generator and the C library's
        ``rand()``: both are seeded with ``seed`` first, so the audio is reproducible.
        """
        self._chunks, self._events = [], []
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((3, pitch), (4, pitch_range), (1, rate)):
            self.lib.espeak_SetParameter(param, value, 0)
        data = text.encode("utf-8")
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
        _LIBC.srand(seed)
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks), self._events


VARIANTS = tuple(f"m{i}" for i in range(1, 8)) + tuple(f"f{i}" for i in range(1, 6))
DEMO_VARIANTS = ("m6", "m7", "f4", "f5")
TRAINING_VARIANTS = tuple(v for v in VARIANTS if v not in DEMO_VARIANTS)
DEMO_SPEAKERS, DEMO_UTTERANCES = 8, 12
"""The demo corpus's size: with every frame counted, enough tokens per (gender, phone) and (pitch bin,
phone) cell for the demo model's D/k = 103 that its gender and pitch selections are not empty."""


_NAME = "synthetic {voice} pitch {pitch}"
"""The SPEAKERS.TXT name of a synthetic speaker: its espeak-ng voice and pitch."""


def speaker_voices(root: str | Path) -> dict[str, str]:
    """Speaker id → the espeak-ng voice variant (``m6``, ``f4``, ...) each speaker of a ``synthesize``d
    corpus speaks with, from its SPEAKERS.TXT (``root``: the LibriSpeech folder)."""
    path = Path(root) / "SPEAKERS.TXT"
    voices = {}
    for sid, speaker in read_speakers(path).items():
        found = re.fullmatch(r"synthetic \S+\+(\w+) pitch \d+", speaker.name)
        if not found:
            raise ValueError(f"{path}: speaker {sid} is not a synthetic voice (name {speaker.name!r})")
        voices[sid] = found.group(1)
    return voices


@dataclass(frozen=True)
class Voice:
    speaker: str
    sex: str
    voice: str
    pitch: int
    pitch_range: int
    rate: int


def _voices(num_speakers: int, rng: random.Random, variants: tuple[str, ...], first_speaker: int) -> list[Voice]:
    """Speakers alternating male and female, each with a variant of its sex drawn at random and its own
    pitch, range and rate; a sex with two speakers or more speaks with two variants or more where there
    are (a draw that gave all of them one variant gives its last speaker the next one), so that a
    voice-disjoint split holds out speakers of both sexes."""
    by_sex = {sex: [v for v in variants if v.startswith(sex.lower())] for sex in "MF"}
    out = []
    for i in range(num_speakers):
        sex = "M" if i % 2 == 0 else "F"
        variant = rng.choice(by_sex[sex])
        pitch = rng.randint(30, 50) if sex == "M" else rng.randint(65, 90)
        speaker = str(1000 + 37 * (first_speaker + i))
        out.append(Voice(speaker, sex, f"en-us+{variant}", pitch, rng.randint(30, 60), rng.randint(140, 185)))
    for sex, choices in by_sex.items():
        mine = [i for i, v in enumerate(out) if v.sex == sex]
        if len(mine) >= 2 and len(choices) >= 2 and len({out[i].voice for i in mine}) == 1:
            shared = out[mine[0]].voice.removeprefix("en-us+")
            other = choices[(choices.index(shared) + 1) % len(choices)]
            out[mine[-1]] = replace(out[mine[-1]], voice=f"en-us+{other}")
    return out


def _tiers(text: str, events: list[tuple], num_samples: int, rate: int) -> dict[str, list[Interval]]:
    """Phone and word intervals in seconds from espeak's events (phone i ends where i+1 starts)."""
    phones = sorted((s, name) for kind, s, name in events if kind == _EV_PHONEME)
    cuts = [min(s, num_samples) for s, _ in phones] + [num_samples]
    spans: list[list] = [[0, cuts[0], ""]] if cuts[0] > 0 else []
    for (start, name), end in zip(phones, cuts[1:]):
        label = espeak_to_arpabet(name)
        if end <= start:
            continue
        if spans and spans[-1][2] == label == "":
            spans[-1][1] = end
        else:
            spans.append([start, end, label])
    phone_tier = [Interval(a / rate, b / rate, lab) for a, b, lab in spans]

    word_starts = sorted((s, pos) for kind, s, pos in events if kind == _EV_WORD)
    words: list[Interval] = []
    for i, (start, (pos, length)) in enumerate(word_starts):
        stop = word_starts[i + 1][0] if i + 1 < len(word_starts) else num_samples
        inside = [(a, b) for a, b, lab in spans if lab and start <= a < stop]
        word = text.encode("utf-8")[pos - 1 : pos - 1 + length].decode("utf-8", "replace").strip(" ,.?!;:").upper()
        if inside and word:
            words.append(Interval(inside[0][0] / rate, inside[-1][1] / rate, word))
    word_tier, t = [], 0.0
    for w in words:
        if w.xmin > t:
            word_tier.append(Interval(t, w.xmin, ""))
        word_tier.append(w)
        t = w.xmax
    if t < num_samples / rate:
        word_tier.append(Interval(t, num_samples / rate, ""))
    return {"words": word_tier, "phones": phone_tier}


def load_sentences() -> list[str]:
    text = resources.files("neurostat").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def synthesize(
    out: str | Path,
    subset: str = "dev-clean",
    num_speakers: int = DEMO_SPEAKERS,
    utterances_per_speaker: int = DEMO_UTTERANCES,
    seed: int = 0,
    progress: bool = True,
    variants: tuple[str, ...] = DEMO_VARIANTS,
    first_speaker: int = 0,
) -> tuple[Path, Path]:
    """Writes the demo corpus under ``out``; returns (LibriSpeech root, alignments dir).

    ``variants``: the espeak-ng voice variants to draw speakers from (at least one male ``m*`` and
    one female ``f*``); ``first_speaker`` offsets the speaker ids, so two corpora can share no speaker.

    espeak-ng keeps internal state from one utterance to the next that no API call resets, so the
    corpus is synthesised in a forked child process that starts with a fresh engine: the same seed
    then gives the same bytes.
    """
    if num_speakers < 1 or utterances_per_speaker < 1:
        raise ValueError("need at least one speaker and one utterance per speaker")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not any(v.startswith("m") for v in variants) or not any(v.startswith("f") for v in variants):
        raise ValueError(f"voice variants must be among {VARIANTS} with at least one m* and one f*; got {variants}")
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(
            _synthesize,
            Path(out),
            subset,
            num_speakers,
            utterances_per_speaker,
            seed,
            progress,
            variants,
            first_speaker,
        ).result()


def _synthesize(
    out: Path,
    subset: str,
    num_speakers: int,
    utterances_per_speaker: int,
    seed: int,
    progress: bool,
    variants: tuple[str, ...],
    first_speaker: int,
) -> tuple[Path, Path]:
    root, align = out / "LibriSpeech", out / "alignments"
    rng = random.Random(seed)
    sentences = load_sentences()
    voices = _voices(num_speakers, rng, tuple(variants), first_speaker)
    espeak = Espeak.get()
    lines = [
        "; Synthetic speakers generated by neurostat synth (espeak-ng voices).",
        "; ID      |SEX| SUBSET           |MINUTES| NAME",
    ]
    bar = tqdm(total=num_speakers * utterances_per_speaker, desc="synth", unit="utt", disable=not progress)
    for v in voices:
        chapter = str(10 * int(v.speaker) % 9973)
        cdir, adir = root / subset / v.speaker / chapter, align / subset / v.speaker / chapter
        cdir.mkdir(parents=True, exist_ok=True)
        adir.mkdir(parents=True, exist_ok=True)
        trans, seconds = [], 0.0
        for u in range(utterances_per_speaker):
            text = " ".join(rng.sample(sentences, rng.randint(1, 2)))
            uid = f"{v.speaker}-{chapter}-{u:04d}"
            raw, events = espeak.say(text, v.voice, v.pitch, v.pitch_range, v.rate, rng.randrange(2**31))
            wave = soxr.resample(raw.astype(np.float32) / 32768.0, espeak.rate, SAMPLE_RATE)
            sf.write(cdir / f"{uid}.flac", np.clip(wave, -1, 1), SAMPLE_RATE, subtype="PCM_16")
            scaled = [(k, s * SAMPLE_RATE / espeak.rate, p) for k, s, p in events]
            write_textgrid(
                adir / f"{uid}.TextGrid", len(wave) / SAMPLE_RATE, _tiers(text, scaled, len(wave), SAMPLE_RATE)
            )
            trans.append(f"{uid} {text.upper()}")
            seconds += len(wave) / SAMPLE_RATE
            bar.update()
        (cdir / f"{v.speaker}-{chapter}.trans.txt").write_text("\n".join(trans) + "\n", encoding="utf-8")
        lines.append(
            f"{v.speaker:<8} | {v.sex} | {subset:<16} | {seconds / 60:5.2f} | "
            + _NAME.format(voice=v.voice, pitch=v.pitch)
        )
    bar.close()
    (root / "SPEAKERS.TXT").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, align
