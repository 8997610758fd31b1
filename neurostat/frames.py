"""Frame geometry of a speech model's convolutional front end, and frame labelling by centre.

A front end of stacked unpadded convolutions (kernels k_i, strides s_i) maps L samples to
frames by the successive rule ``L <- floor((L - k_i) / s_i) + 1``.  Frame t covers the samples
``[stride * t, stride * t + receptive_field)`` and is centred at
``(stride * t + receptive_field / 2) / sample_rate`` seconds.  Frames are labelled with the
interval that contains their centre (``centre``, neurostat's default; pitch is sampled at the same
centres), or, as in the paper, with the interval of largest overlap with the stride grid cell
``[stride * t, stride * (t + 1))`` (``overlap``: 20 ms cells for the wav2vec2 family).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FrameGeometry:
    sample_rate: int
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]

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

    def num_frames(self, num_samples: int) -> int:
        """Frame count for ``num_samples`` samples (HF ``_get_feat_extract_output_lengths``)."""
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            if n < k:
                return 0
            n = (n - k) // s + 1
        return n

    def centres(self, num_frames: int) -> np.ndarray:
        """Frame centres in seconds (float64)."""
        t = np.arange(num_frames, dtype=np.float64)
        return (self.stride * t + self.receptive_field / 2) / self.sample_rate

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conv_kernel"], d["conv_stride"] = list(self.conv_kernel), list(self.conv_stride)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FrameGeometry":
        return cls(int(d["sample_rate"]), tuple(d["conv_kernel"]), tuple(d["conv_stride"]))

    @classmethod
    def from_config(cls, config, sample_rate: int) -> "FrameGeometry":
        """Geometry of an HF wav2vec2-family config (``conv_kernel``, ``conv_stride``)."""
        return cls(
            int(sample_rate), tuple(int(k) for k in config.conv_kernel), tuple(int(s) for s in config.conv_stride)
        )

    def describe(self) -> str:
        return f"stride {self.stride} / receptive field {self.receptive_field} samples at {self.sample_rate} Hz"


def default_geometry() -> FrameGeometry:
    """The geometry of the wav2vec2/HuBERT family's default config and feature extractor."""
    from transformers import HubertConfig, Wav2Vec2FeatureExtractor

    return FrameGeometry.from_config(HubertConfig(), Wav2Vec2FeatureExtractor().sampling_rate)


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
    non-overlapping."""
    out = np.full(num_frames, -1, dtype=np.int64)
    best = np.zeros(num_frames)
    lo = np.arange(num_frames) * cell
    hi = lo + cell
    for start, end, label in zip(starts, ends, ids):
        first, last = int(start // cell), min(int(np.ceil(end / cell)), num_frames)
        for t in range(max(first, 0), last):
            overlap = min(end, hi[t]) - max(start, lo[t])
            if overlap > best[t] + 1e-9:
                best[t], out[t] = overlap, label
    return out
