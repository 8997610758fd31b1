"""Token selection: which frames of an utterance are counted.

- ``phone-mid`` (the paper): split the frame-level phone sequence into maximal runs of identical
  labels and take the middle frame ``(start + end) // 2`` of each run (``end`` inclusive).  The
  paper's code never emits the final run (nearly always silence); neurostat keeps it unless
  ``drop_final_run`` (the paper preset), which drops the last run's tokens in every mode.
- ``all``: every labelled frame.
- ``no-silence``: every labelled frame whose phone is not ``sil`` or ``spn``.

Frames without a phone (−1) are never tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MODES = ("phone-mid", "all", "no-silence")


def token_mask(
    phones: np.ndarray,
    mode: str,
    non_speech: Sequence[int] = (),
    drop_final_run: bool = False,
    starts: Sequence[int] | np.ndarray = (0,),
) -> np.ndarray:
    """Boolean mask of the token frames of one utterance's phone-index sequence, or of several utterances'
    sequences concatenated, each beginning at one of ``starts`` (a run never crosses an utterance start;
    each utterance's final run is its own)."""
    phones, starts = np.asarray(phones), np.asarray(starts, dtype=np.int64)
    first = np.ones(len(phones), dtype=bool)  # the frames that begin a run
    np.not_equal(phones[1:], phones[:-1], out=first[1:])
    if len(phones):
        first[starts] = True
    mask = _mask(phones, mode, non_speech, first)
    if drop_final_run and len(phones):
        run = np.cumsum(first) - 1
        final = np.zeros(run[-1] + 1, dtype=bool)
        final[run[np.append(starts[1:], len(phones)) - 1]] = True  # the run of each utterance's last frame
        mask &= ~final[run]
    return mask


def _mask(phones: np.ndarray, mode: str, non_speech: Sequence[int], first: np.ndarray) -> np.ndarray:
    labelled = phones >= 0
    if mode == "all":
        return labelled
    if mode == "no-silence":
        return labelled & ~np.isin(phones, np.asarray(non_speech, dtype=phones.dtype))
    if mode == "phone-mid":
        mask = np.zeros(len(phones), dtype=bool)
        starts = np.flatnonzero(first)
        ends = np.append(starts[1:], len(phones)) - 1
        mids = (starts + ends) // 2
        mask[mids[phones[starts] >= 0]] = True
        return mask
    raise ValueError(f"unknown token mode {mode!r}; choose one of {MODES}")
