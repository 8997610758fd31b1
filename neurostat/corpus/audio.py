"""Audio loading with the checks a corpus-scale run needs (FLAC via soundfile, soxr resampling)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr


class Skip(Exception):
    """An utterance that cannot be used; ``reason`` is a short key the summary counts by."""

    def __init__(self, reason: str, path: str | Path, message: str):
        super().__init__(f"{path}: {message}")
        self.reason, self.path, self.message = reason, str(path), message


def load_audio(
    path: str | Path, sample_rate: int, strict: bool = False, out: np.ndarray | None = None
) -> tuple[np.ndarray, int, str]:
    """Mono float32 waveform at ``sample_rate``, the file's own rate and the SHA-1 of its bytes (the file is
    read once through one descriptor, hashed, then decoded from the same descriptor: the digest that
    ``prepare`` records and a later decode checks belongs to the bytes decoded).

    With ``out`` (a C-contiguous float32 array) a waveform of exactly ``len(out)`` samples is decoded into it
    and ``out`` is returned; otherwise a new array.  A file at another rate is resampled with soxr (or
    refused when ``strict``).  Corrupt, empty and multi-channel files raise :class:`Skip`.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        data = _read_all(fd)
        if not data:
            raise Skip("empty-audio", path, "audio file is empty (0 bytes)")
        digest = hashlib.sha1(data).hexdigest()
        os.lseek(fd, 0, os.SEEK_SET)
        wave, sr = _decode(fd, path, sample_rate, out)
    finally:
        os.close(fd)
    if sr != sample_rate:
        if strict:
            raise Skip(
                "wrong-sample-rate",
                path,
                f"audio is {sr} Hz, the model expects {sample_rate} Hz (--strict refuses to resample)",
            )
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32)
        if out is not None and len(wave) == len(out):
            out[:] = wave
            wave = out
    return wave, sr, digest


def _read_all(fd: int) -> bytes:
    chunks, size = [], os.fstat(fd).st_size
    while chunk := os.read(fd, max(size, 1 << 16)):
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(fd: int, path: str | Path, sample_rate: int, out: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The file's samples (into ``out`` when they fit it at the file's own rate) and its rate."""
    try:
        with sf.SoundFile(fd, closefd=False) as f:
            if f.frames == 0:
                raise Skip("empty-audio", path, "audio file has no samples")
            if f.channels != 1:
                raise Skip(
                    "multichannel-audio",
                    path,
                    f"audio has {f.channels} channels; neurostat expects mono speech: downmix it first "
                    "(e.g. sox in.flac out.flac remix -)",
                )
            fits = out is not None and f.samplerate == sample_rate and f.frames == len(out)
            wave = f.read(dtype="float32", out=out if fits else None)
            return wave, f.samplerate
    except Skip:
        raise
    except Exception as e:  # soundfile raises several types for broken files
        raise Skip("corrupt-audio", path, f"cannot decode audio ({e})") from None
