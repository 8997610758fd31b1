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
    phones: np.ndarray, mode: str, non_speech: Sequence[int] = (), drop_final_run: bool = False
) -> np.ndarray:
    """Boolean mask of the token frames of one utterance's phone-index sequence."""
    phones = np.asarray(phones)
    mask = _mask(phones, mode, non_speech)
    if drop_final_run and len(phones):
        last = np.flatnonzero(phones != phones[-1])
        mask[last[-1] + 1 if len(last) else 0 :] = False
    return mask


def _mask(phones: np.ndarray, mode: str, non_speech: Sequence[int]) -> np.ndarray:
    labelled = phones >= 0
    if mode == "all":
        return labelled
    if mode == "no-silence":
        return labelled & ~np.isin(phones, np.asarray(non_speech, dtype=phones.dtype))
    if mode == "phone-mid":
        mask = np.zeros(len(phones), dtype=bool)
        if len(phones) == 0:
            return mask
        starts = np.flatnonzero(np.r_[True, phones[1:] != phones[:-1]])
        ends = np.r_[starts[1:], len(phones)] - 1
        mids = (starts + ends) // 2
        mask[mids[phones[starts] >= 0]] = True
        return mask
    raise ValueError(f"unknown token mode {mode!r}; choose one of {MODES}")
