"""Audio loading with the checks a corpus-scale run needs (FLAC, WAV ... via soundfile; NIST SPHERE, TIMIT's
format, read here; soxr resampling), of a whole file or of a span of it."""

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

    def record(self, utt_id: str) -> dict:
        """The skip record of utterance ``utt_id`` (:func:`skip_record`)."""
        return skip_record(utt_id, self.reason, self.path, self.message)


def skip_record(utt_id: str, reason: str, file: str | Path, message: str) -> dict:
    """A line of ``skips.jsonl``: the utterance, the reason the summary counts by, the file at fault and what is
    wrong with it."""
    return {"id": utt_id, "reason": reason, "file": str(file), "message": message}


def load_audio(
    path: str | Path,
    sample_rate: int,
    strict: bool = False,
    out: np.ndarray | None = None,
    span: tuple[float, float] | None = None,
) -> tuple[np.ndarray, int, str]:
    """Mono float32 waveform at ``sample_rate``, the file's own rate and a SHA-1 digest of what was read.

    A whole file is read once through one descriptor, hashed, then decoded from the same descriptor: the digest
    that ``prepare`` records and a later decode checks belongs to the bytes decoded.  With ``span`` (start and end
    in seconds) only samples ``[round(start·rate), round(end·rate))`` at the file's own rate are read, and the
    digest is of those samples (a long recording is not read again for each of its segments).

    With ``out`` (a C-contiguous float32 array) a waveform of exactly ``len(out)`` samples is decoded into it
    and ``out`` is returned; otherwise a new array.  A file at another rate is resampled with soxr (or
    refused when ``strict``).  Corrupt, empty and multi-channel files raise :class:`Skip`.
    """
    if span is not None:
        wave, sr = _read_span(path, span)
        return (*finish_audio(wave, sr, path, sample_rate, strict, out), samples_digest(wave))
    fd = os.open(path, os.O_RDONLY)
    try:
        data = _read_all(fd)
        if not data:
            raise Skip("empty-audio", path, "audio file is empty (0 bytes)")
        digest = hashlib.sha1(data).hexdigest()
        if data.startswith(SPHERE_MAGIC):
            wave, sr = read_sphere(data, path)
        else:
            os.lseek(fd, 0, os.SEEK_SET)
            wave, sr = _decode(fd, path, sample_rate, out)
    finally:
        os.close(fd)
    return (*finish_audio(wave, sr, path, sample_rate, strict, out), digest)


def finish_audio(
    wave: np.ndarray, sr: int, path: str | Path, sample_rate: int, strict: bool, out: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """The waveform at ``sample_rate`` (resampled with soxr, or refused when ``strict``; copied into ``out``
    when it fits) and the rate it was read at."""
    if sr != sample_rate:
        if strict:
            raise Skip(
                "wrong-sample-rate",
                path,
                f"audio is {sr} Hz, the model expects {sample_rate} Hz (--strict refuses to resample)",
            )
        wave = soxr.resample(wave, sr, sample_rate).astype(np.float32)
    if out is not None and len(wave) == len(out) and wave is not out:
        out[:] = wave
        wave = out
    return wave, sr


def samples_digest(wave: np.ndarray) -> str:
    """SHA-1 of decoded float32 samples (what a span of a file is checked by)."""
    return hashlib.sha1(np.ascontiguousarray(wave, dtype=np.float32).tobytes()).hexdigest()


def span_samples(span: tuple[float, float], sr: int) -> tuple[int, int]:
    """First sample and count of ``[start, end)`` seconds at rate ``sr``: each time rounded to the nearest
    sample (halves up), so a span given on the sample grid is cut exactly."""
    first, last = (int(np.floor(t * sr + 0.5)) for t in span)
    return first, last - first


def _read_span(path: str | Path, span: tuple[float, float]) -> tuple[np.ndarray, int]:
    """The samples of ``span`` (seconds) at the file's own rate; a span outside the file is a Skip."""
    try:
        with open(path, "rb") as f:
            data = f.read(len(SPHERE_MAGIC))
            if data == SPHERE_MAGIC:  # a SPHERE file is read whole, once
                data += f.read()
    except OSError as e:
        raise Skip("missing-audio", path, f"cannot read audio ({e.strerror})") from None
    if data.startswith(SPHERE_MAGIC):
        wave, sr = read_sphere(data, path)
        first, n = span_samples(span, sr)
        _check_span(path, span, first, n, len(wave))
        return wave[first : first + n], sr
    try:
        with sf.SoundFile(path) as f:
            first, n = span_samples(span, f.samplerate)
            _check_span(path, span, first, n, f.frames)
            if f.channels != 1:
                raise Skip("multichannel-audio", path, f"audio has {f.channels} channels; neurostat expects mono")
            f.seek(first)
            return f.read(n, dtype="float32"), f.samplerate
    except Skip:
        raise
    except Exception as e:  # soundfile raises several types for broken files
        raise Skip("corrupt-audio", path, f"cannot decode audio ({e})") from None


def _check_span(path: str | Path, span: tuple[float, float], first: int, n: int, total: int) -> None:
    if first < 0 or n <= 0 or first + n > total:
        raise Skip(
            "outside-audio",
            path,
            f"segment {span[0]:.3f}-{span[1]:.3f} s (samples {first}-{first + n}) is not inside the audio's "
            f"{total} samples",
        )


SPHERE_MAGIC = b"NIST_1A"


def read_sphere(data: bytes, path: str | Path) -> tuple[np.ndarray, int]:
    """The samples (float32, scaled as soundfile scales 16-bit PCM: x / 32768) and rate of a NIST SPHERE file's
    bytes.  Only uncompressed mono 16-bit PCM is read (TIMIT's format); anything else is a Skip saying so."""
    fields = sphere_header(data, path)
    if fields.get("sample_coding", "pcm") != "pcm":
        raise Skip(
            "unsupported-audio",
            path,
            f"SPHERE sample coding {fields.get('sample_coding')!r}: neurostat reads uncompressed 16-bit PCM "
            "(decompress with sph2pipe first)",
        )
    if fields.get("sample_n_bytes") != 2:
        raise Skip(
            "unsupported-audio",
            path,
            f"SPHERE audio of {fields.get('sample_n_bytes')} byte(s) per sample: neurostat reads 16-bit PCM "
            "(convert with sox)",
        )
    if fields.get("channel_count", 1) != 1:
        raise Skip(
            "multichannel-audio", path, f"SPHERE audio has {fields['channel_count']} channels; neurostat expects mono"
        )
    order = {"01": "<", "10": ">"}.get(str(fields.get("sample_byte_format", "01")))
    if order is None or not isinstance(fields.get("sample_rate"), int):
        raise Skip("corrupt-audio", path, "SPHERE header lacks a sample rate or a byte order (01 or 10)")
    body = data[fields["header_size"] :]
    count = fields.get("sample_count", len(body) // 2)
    if count * 2 > len(body):
        raise Skip("corrupt-audio", path, f"SPHERE header says {count} samples, the file holds {len(body) // 2}")
    if count == 0:
        raise Skip("empty-audio", path, "audio file has no samples")
    samples = np.frombuffer(body, dtype=f"{order}i2", count=count)
    return samples.astype(np.float32) / np.float32(32768), fields["sample_rate"]


def sphere_header(data: bytes, path: str | Path) -> dict:
    """The fields of a SPHERE header (``name -i 16000``: integers as int, ``-r`` as float, ``-sN`` as str)
    and its size in bytes (``header_size``)."""
    lines = data[:64].split(b"\n")
    try:
        size = int(lines[1])
        text = data[:size].decode("ascii")
    except (IndexError, ValueError, UnicodeDecodeError):
        raise Skip("corrupt-audio", path, "not a readable NIST SPHERE header") from None
    fields: dict = {"header_size": size}
    for line in text.splitlines()[2:]:
        if line.strip() == "end_head":
            return fields
        name, kind, value = (line.split(None, 2) + ["", ""])[:3]
        try:
            fields[name] = int(value) if kind == "-i" else float(value) if kind == "-r" else value
        except ValueError:
            raise Skip("corrupt-audio", path, f"SPHERE header field {name}: {value!r} is not a number") from None
    raise Skip("corrupt-audio", path, "SPHERE header has no end_head")


def write_sphere(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Writes int16 mono ``samples`` as an uncompressed little-endian NIST SPHERE file (TIMIT's layout)."""
    samples = np.asarray(samples, dtype="<i2")
    fields = [
        ("channel_count", "-i", 1),
        ("sample_count", "-i", len(samples)),
        ("sample_rate", "-i", sample_rate),
        ("sample_n_bytes", "-i", 2),
        ("sample_byte_format", "-s2", "01"),
        ("sample_sig_bits", "-i", 16),
        ("sample_coding", "-s3", "pcm"),
    ]
    text = "NIST_1A\n   1024\n" + "".join(f"{n} {k} {v}\n" for n, k, v in fields) + "end_head\n"
    Path(path).write_bytes(text.encode("ascii").ljust(1024, b" ") + samples.tobytes())


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
