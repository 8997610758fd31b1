"""Frame geometry of a speech model's front end, and frame labelling by centre.

A front end of stacked convolutions (kernels k_i, strides s_i, padding p_i on each side) maps L samples
to frames.  Frame t covers the samples ``[stride * t - offset, stride * t - offset + receptive_field)``
and is centred at ``(stride * t + receptive_field / 2 - offset) / sample_rate`` seconds.  Frames are
labelled with the interval that contains their centre (``centre``, neurostat's default; pitch is sampled
at the same centres), or, as in the paper, with the interval of largest overlap with the stride grid cell
``[stride * t, stride * (t + 1))`` (``overlap``: 20 ms cells for the wav2vec2 family).

How many frames an utterance has is the model's own rule (:data:`COUNTS`): the unpadded convolutions of
the wav2vec2 family, ``L <- floor((L - k_i) / s_i) + 1`` (HF ``_get_feat_extract_output_lengths``);
Whisper's frames whose centre lies inside the utterance (its front end is padded: frame t is centred at
``stride * t``); FastConformer's whole hops of its STFT, ``L // hop``, then each padded convolution's
``floor((L + 2 p_i - k_i) / s_i) + 1``.  Where each family's geometry comes from is
:mod:`neurostat.model.families`.  Whisper also sees fixed ``window``s of samples (30 s): an utterance is cut
into windows, each a separate forward whose frames continue the utterance's frame numbering (a window holds
exactly ``window / stride`` frames).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

COUNTS = ("conv", "centre", "hops")
"""Frame-count rules: unpadded convolutions (the wav2vec2 family), frames whose centre lies inside the
utterance (Whisper), or whole hops of a centred STFT and then padded convolutions (FastConformer)."""


@dataclass(frozen=True)
class FrameGeometry:
    sample_rate: int
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_padding: tuple[int, ...] = ()  # per layer, on each side; () = unpadded (the wav2vec2 family)
    window: int = 0  # samples of the model's fixed input window (Whisper); 0 = whole utterances
    count: str = ""  # one of COUNTS; "" = conv when unpadded, centre when padded (geometries written before it)

    @property
    def rule(self) -> str:
        """The frame-count rule (:data:`COUNTS`) this geometry follows."""
        return self.count or ("centre" if self.conv_padding else "conv")

    @property
    def stride(self) -> int:
        return int(np.prod(self.conv_stride))

    @property
    def receptive_field(self) -> int:
        field, jump = 1, 1
        for k, s in zip(self.conv_kernel, self.conv_stride):
            field += (k - 1) * jump
            jump *= s
        return field

    @property
    def offset(self) -> int:
        """Samples by which frame 0's receptive field starts before sample 0 (the layers' padding)."""
        offset, jump = 0, 1
        for p, s in zip(self.conv_padding, self.conv_stride):
            offset += p * jump
            jump *= s
        return offset

    @property
    def window_frames(self) -> int:
        """Frames of one input window (0 without windows)."""
        return self.window // self.stride

    def num_frames(self, num_samples: int) -> int:
        """Frame count for ``num_samples`` samples by the model's own rule (:attr:`rule`)."""
        rule = self.rule
        if rule == "centre":
            centre0 = self.receptive_field - 2 * self.offset  # twice frame 0's centre, in samples
            return max(0, -((centre0 - 2 * num_samples) // (2 * self.stride)))
        layers = list(zip(self.conv_kernel, self.conv_stride, self.conv_padding or (0,) * len(self.conv_kernel)))
        n = num_samples
        if rule == "hops":
            n, layers = n // self.conv_stride[0], layers[1:]
        for k, s, p in layers:
            if n + 2 * p < k or n <= 0:
                return 0
            n = (n + 2 * p - k) // s + 1
        return n

    def centres(self, num_frames: int) -> np.ndarray:
        """Frame centres in seconds (float64)."""
        t = np.arange(num_frames, dtype=np.float64)
        return (self.stride * t + self.receptive_field / 2 - self.offset) / self.sample_rate

    def to_dict(self) -> dict:
        """The geometry as JSON; the fields of a padded, windowed geometry only when they are set."""
        d = {
            "sample_rate": self.sample_rate,
            "conv_kernel": list(self.conv_kernel),
            "conv_stride": list(self.conv_stride),
        }
        if self.conv_padding:
            d["conv_padding"] = list(self.conv_padding)
        if self.window:
            d["window"] = self.window
        if self.count:
            d["count"] = self.count
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FrameGeometry":
        return cls(
            int(d["sample_rate"]),
            tuple(d["conv_kernel"]),
            tuple(d["conv_stride"]),
            tuple(d.get("conv_padding", ())),
            int(d.get("window", 0)),
            str(d.get("count", "")),
        )

    def describe(self) -> str:
        windows = f", windows of {self.window} samples" if self.window else ""
        count = f", frames counted by {self.count}" if self.count else ""
        return (
            f"stride {self.stride} / receptive field {self.receptive_field} samples at {self.sample_rate} Hz"
            f"{windows}{count}"
        )

    def at_rate(self, sample_rate: int) -> "FrameGeometry":
        """The same layers at another sample rate."""
        return replace(self, sample_rate=int(sample_rate))


def default_geometry(sample_rate: int | None = None) -> FrameGeometry:
    """The geometry of the wav2vec2/HuBERT family's default config and feature extractor (transformers'
    defaults: seven convolutions, 20 ms frames at 16 kHz; a test holds it to the family table's geometry of
    that config), at ``sample_rate`` when given.  Known without transformers and torch (seconds of every
    ``prepare`` without ``--model``)."""
    return FrameGeometry(sample_rate or 16000, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2))


def label_frames(starts: np.ndarray, ends: np.ndarray, ids: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Label of the interval ``[start, end)`` containing each centre, −1 where none does.

    Intervals must be sorted and non-overlapping (the TextGrid reader checks that).
    """
    idx = np.searchsorted(starts, centres, side="right") - 1
    ok = idx >= 0
    ok[ok] = centres[ok] < ends[idx[ok]]
    out = np.full(len(centres), -1, dtype=np.int64)
    out[ok] = np.asarray(ids)[idx[ok]]
    return out


def label_frames_overlap(
    starts: np.ndarray, ends: np.ndarray, ids: np.ndarray, cell: float, num_frames: int
) -> np.ndarray:
    """Label of the interval with the largest overlap with each grid cell ``[cell * t, cell * (t + 1))``
    (seconds), −1 where none overlaps.  Overlaps within 1 ns are a tie, which the earlier interval wins
    (alignment times are far coarser, so float rounding cannot break a true tie).  Intervals sorted,
    non-overlapping.

    Vectorised over (interval, cell) pairs: each round takes every cell's next candidate in interval order and
    keeps it where it beats the cell's best so far by more than 1 ns — the rule of a loop over the intervals,
    in as many rounds as a cell has candidates (two or three)."""
    starts, ends = np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)
    out = np.full(num_frames, -1, dtype=np.int64)
    first = np.maximum((starts // cell).astype(np.int64), 0)
    counts = np.maximum(np.minimum(np.ceil(ends / cell).astype(np.int64), num_frames) - first, 0)
    interval = np.repeat(np.arange(len(starts)), counts)  # the pairs, interval by interval
    t = first[interval] + np.arange(len(interval)) - np.repeat(np.cumsum(counts) - counts, counts)
    lo = t * cell
    overlap = np.minimum(ends[interval], lo + cell) - np.maximum(starts[interval], lo)
    order = np.argsort(t, kind="stable")  # cell by cell, each cell's candidates in interval order
    t, interval, overlap = t[order], interval[order], overlap[order]
    rank = np.arange(len(t)) - np.searchsorted(t, t)  # a pair's place among its cell's candidates
    best = np.zeros(num_frames)
    labels = np.asarray(ids).astype(np.int64)
    for r in range(int(rank.max()) + 1 if len(rank) else 0):
        mine = rank == r
        cells, values = t[mine], overlap[mine]
        wins = values > best[cells] + 1e-9
        best[cells[wins]] = values[wins]
        out[cells[wins]] = labels[interval[mine][wins]]
    return out
