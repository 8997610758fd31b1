"""Audio loading with the checks a corpus-scale run needs (FLAC via soundfile, soxr resampling)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class Skip(Exception):
    """An utterance that cannot be used; ``reason`` is a short key the summary counts by."""

    def __init__(self, reason: str, path: str | Path, message: str):
        super().__init__(f"{path}: {message}")
        self.reason, self.path, self.message = reason, str(path), message


def load_audio(path: str | Path, sample_rate: int, strict: bool = False) -> tuple[np.ndarray, int, str]:
    """Mono float32 waveform at ``sample_rate``, the file's own rate and the SHA-1 of its bytes (read
    once, hashed and decoded from memory: the digest that ``prepare`` records and a later decode checks).

    A file at another rate is resampled with soxr (or refused when ``strict``).  Corrupt, empty
    and multi-channel files raise :class:`Skip`.
    """
    data = Path(path).read_bytes()
    if not data:
        raise Skip("empty-audio", path, "audio file is empty (0 bytes)")
    digest = hashlib.sha1(data).hexdigest()
    try:
        wave, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises several types for broken files
        raise Skip("corrupt-audio", path, f"cannot decode audio ({e})") from None
    if wave.shape[0] == 0:
        raise Skip("empty-audio", path, "audio file has no samples")
    if wave.shape[1] != 1:
        raise Skip(
            "multichannel-audio",
            path,
            f"audio has {wave.shape[1]} channels; neurostat expects mono speech: downmix it first "
            "(e.g. sox in.flac out.flac remix -)",
        )
    wave = wave[:, 0]
    if sr != sample_rate:
        if strict:
            raise Skip(
                "wrong-sample-rate",
                path,
                f"audio is {sr} Hz, the model expects {sample_rate} Hz (--strict refuses to resample)",
            )
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32)
    return wave, sr, digest
