"""Frame geometry of a speech model's convolutional front end, and frame labelling by centre.

A front end of stacked unpadded convolutions (kernels k_i, strides s_i) maps L samples to
frames by the successive rule ``L <- floor((L - k_i) / s_i) + 1``.  Frame t covers the samples
``[stride * t, stride * t + receptive_field)`` and is centred at
``(stride * t + receptive_field / 2) / sample_rate`` seconds.  Frames are labelled with the
interval that contains their centre (``centre``, neurostat's default; pitch is sampled at the same
centres), or, as in the paper, with the interval of largest overlap with the stride grid cell
``[stride * t, stride * (t + 1))`` (``overlap``: 20 ms cells for the wav2vec2 family).

Whisper's front end is padded: a log-mel STFT centred on its frames (``n_fft`` samples every ``hop_length``,
``n_fft // 2`` samples of reflect padding) and two convolutions of kernel 3 padded by 1, the second of
stride 2.  A padded geometry (``conv_padding``) starts frame t's field ``offset`` samples before
``stride * t``, so frame t of Whisper is centred at ``stride * t`` (20 ms grid, Whisper's own timestamps);
its frames are those whose centre lies inside the utterance.  Whisper also sees fixed ``window``s of
samples (30 s): an utterance is cut into windows, each a separate forward whose frames continue the
utterance's frame numbering (a window holds exactly ``window / stride`` frames).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np

WHISPER_CONVS = ((3, 1), (3, 1))
"""(kernel, padding) of Whisper's two encoder convolutions (transformers' ``WhisperEncoder`` fixes them; the
second's stride follows from the config: mel frames per window over ``max_source_positions``)."""


@dataclass(frozen=True)
class FrameGeometry:
    sample_rate: int
    conv_kernel: tuple[int, ...]
    conv_stride: tuple[int, ...]
    conv_padding: tuple[int, ...] = ()  # per layer, on each side; () = unpadded (the wav2vec2 family)
    window: int = 0  # samples of the model's fixed input window (Whisper); 0 = whole utterances

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
        """Frame count for ``num_samples`` samples: unpadded, HF ``_get_feat_extract_output_lengths``;
        padded, the frames whose centre lies before the utterance's end (over windows, the same count)."""
        if self.conv_padding:
            centre0 = self.receptive_field - 2 * self.offset  # twice frame 0's centre, in samples
            return max(0, -((centre0 - 2 * num_samples) // (2 * self.stride)))
        n = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            if n < k:
                return 0
            n = (n - k) // s + 1
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
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FrameGeometry":
        return cls(
            int(d["sample_rate"]),
            tuple(d["conv_kernel"]),
            tuple(d["conv_stride"]),
            tuple(d.get("conv_padding", ())),
            int(d.get("window", 0)),
        )

    @classmethod
    def from_config(cls, config, sample_rate: int, feature_extractor=None) -> "FrameGeometry":
        """Geometry of an HF wav2vec2-family config (``conv_kernel``, ``conv_stride``), or of a Whisper
        config with its ``feature_extractor`` (:meth:`whisper`)."""
        if getattr(config, "model_type", None) == "whisper":
            if feature_extractor is None:
                raise ValueError("a Whisper model's frame geometry needs its feature extractor")
            return cls.whisper(config, feature_extractor)
        return cls(
            int(sample_rate), tuple(int(k) for k in config.conv_kernel), tuple(int(s) for s in config.conv_stride)
        )

    @classmethod
    def whisper(cls, config, feature_extractor, convs: tuple[tuple[int, int], ...] = WHISPER_CONVS) -> "FrameGeometry":
        """Whisper's geometry from its config (``max_source_positions``) and its feature extractor (``n_fft``,
        ``hop_length``, ``n_samples`` = ``chunk_length`` × ``sampling_rate``); ``convs``: the encoder's
        convolutions as (kernel, padding), the last one's stride taking mel frames to encoder frames.
        A ValueError when the window is not a whole number of encoder frames."""
        fe = feature_extractor
        hop, window, frames = int(fe.hop_length), int(fe.n_samples), int(config.max_source_positions)
        mel_frames = window // hop
        if window % hop or mel_frames % frames:
            raise ValueError(
                f"a window of {window} samples ({fe.chunk_length} s) is {window / hop:g} mel frames of {hop} "
                f"samples, not a whole number of windows of the config's {frames} max_source_positions"
            )
        strides = (1,) * (len(convs) - 1) + (mel_frames // frames,)
        return cls(
            int(fe.sampling_rate),
            (int(fe.n_fft), *(k for k, _ in convs)),
            (hop, *strides),
            (int(fe.n_fft) // 2, *(p for _, p in convs)),
            window,
        )

    def describe(self) -> str:
        windows = f", windows of {self.window} samples" if self.window else ""
        return (
            f"stride {self.stride} / receptive field {self.receptive_field} samples at {self.sample_rate} Hz{windows}"
        )

    def at_rate(self, sample_rate: int) -> "FrameGeometry":
        """The same layers at another sample rate."""
        return replace(self, sample_rate=int(sample_rate))


def default_geometry(cache: str | Path | None = None) -> FrameGeometry:
    """The geometry of the wav2vec2/HuBERT family's default config and feature extractor.  With ``cache`` (a
    folder) it is kept there per transformers version, so that later calls read it without importing
    transformers and torch (seconds, which `neurostat prepare` would spend on every run)."""
    path = None if cache is None else Path(cache) / f"default-geometry-transformers-{version('transformers')}.json"
    if path is not None:
        try:
            return FrameGeometry.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):  # none written yet, or a file cut short
            pass
    from transformers import HubertConfig, Wav2Vec2FeatureExtractor

    geometry = FrameGeometry.from_config(HubertConfig(), Wav2Vec2FeatureExtractor().sampling_rate)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(geometry.to_dict()))
            os.replace(tmp, path)
        except OSError:  # a read-only cache: computed each time
            pass
    return geometry


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
