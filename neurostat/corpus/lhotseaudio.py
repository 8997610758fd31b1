"""Audio that Lhotse reads: the span of a Lhotse recording, for ``--corpus lhotse`` at prepare and at collect."""

from __future__ import annotations

import copy

import numpy as np

from ..errors import UserError
from .audio import Skip, finish_audio, samples_digest


class MissingExtraError(UserError, ImportError):
    """An optional dependency that is not installed; the message names the extra that installs it."""


def lhotse_module():
    """The ``lhotse`` package, or a :class:`MissingExtraError` naming the extra that installs it."""
    try:
        import lhotse
    except ImportError as e:
        raise MissingExtraError(
            f"--corpus lhotse reads Lhotse manifests with the lhotse package ({e}): pip install 'neurostat[lhotse]'"
        ) from None
    return lhotse


def load_recording(
    recording: dict,
    channel: int | None,
    span: tuple[float, float],
    sample_rate: int,
    strict: bool,
    out: np.ndarray | None,
) -> tuple[np.ndarray, int, str]:
    """The ``span`` (seconds) of a Lhotse recording (its ``to_dict()``), read by Lhotse (cut to the sample as
    Lhotse rounds times) at ``sample_rate``; the recording's rate and the digest of the span's samples."""
    rec = lhotse_module().Recording.from_dict(copy.deepcopy(recording))  # from_dict takes the dict apart
    where = rec.sources[0].source if len(rec.sources) == 1 else f"lhotse recording {rec.id}"
    try:
        samples = rec.load_audio(channels=channel, offset=span[0], duration=span[1] - span[0])
    except Exception as e:  # lhotse and its audio back ends raise many kinds
        raise Skip("corrupt-audio", where, f"Lhotse cannot read recording {rec.id} ({e})") from None
    if samples.shape[0] != 1:
        raise Skip("multichannel-audio", where, f"recording {rec.id} gave {samples.shape[0]} channels")
    wave = np.ascontiguousarray(samples[0], dtype=np.float32)
    if len(wave) == 0:
        raise Skip("empty-audio", where, f"the span {span[0]:.3f}-{span[1]:.3f} s of recording {rec.id} has no samples")
    return (*finish_audio(wave, rec.sampling_rate, where, sample_rate, strict, out), samples_digest(wave))
