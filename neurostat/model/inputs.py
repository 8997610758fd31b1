"""What each family's config and feature extractor say about its input, read in one place beside the family
table (:mod:`neurostat.model.families`, which names these readers): the frame geometry, Whisper's log-mel
settings, a filterbank family's features of one utterance, the checkpoint's waveform normalisation.  With the table, the only place that spells the attribute
names of transformers' configs and feature extractors.  A reader that cannot make sense of them raises a
ValueError saying why; the family names the model in the error it makes of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..frames import FrameGeometry


def waveform_geometry(config, sample_rate: int) -> FrameGeometry:
    """The geometry of a waveform family's config: its conv front end's kernels and strides at ``sample_rate``."""
    return FrameGeometry(
        int(sample_rate), tuple(int(k) for k in config.conv_kernel), tuple(int(s) for s in config.conv_stride)
    )


def wav2vec2_geometry(config, fe) -> FrameGeometry:
    """The conv front end's kernels and strides at the feature extractor's rate."""
    return waveform_geometry(config, fe.sampling_rate)


WHISPER_CONVS = ((3, 1), (3, 1))
"""(kernel, padding) of Whisper's two encoder convolutions (transformers' ``WhisperEncoder`` fixes them; the
second's stride follows from the config: mel frames per window over ``max_source_positions``)."""


@dataclass(frozen=True)
class LogMelSettings:
    """What Whisper's feature extractor does, read from it once: an STFT of ``n_fft`` every ``hop`` samples,
    ``filters`` [frequencies, mel bins], windows of ``window`` samples (``seconds``) padded with ``padding``."""

    n_fft: int
    hop: int
    window: int
    seconds: float
    bins: int
    padding: float
    filters: np.ndarray
    sample_rate: int

    @classmethod
    def of(cls, fe) -> LogMelSettings:
        """The settings of a ``WhisperFeatureExtractor``; a ValueError saying why for another feature extractor or
        one that dithers (random features)."""
        missing = [a for a in ("n_fft", "hop_length", "n_samples", "chunk_length", "mel_filters") if not hasattr(fe, a)]
        if missing:
            raise ValueError(f"its feature extractor ({type(fe).__name__}) is not Whisper's (no {', '.join(missing)})")
        if getattr(fe, "dither", 0.0):
            raise ValueError(
                f"its feature extractor dithers (dither={fe.dither}), which makes the log-mel features "
                "random; save it with dither=0.0"
            )
        return cls(
            int(fe.n_fft), int(fe.hop_length), int(fe.n_samples), float(fe.chunk_length), int(fe.feature_size),
            float(fe.padding_value), np.asarray(fe.mel_filters), int(fe.sampling_rate),
        )  # fmt: skip


def whisper_geometry(config, fe, convs: tuple[tuple[int, int], ...] = WHISPER_CONVS) -> FrameGeometry:
    """Whisper's geometry from its config (``max_source_positions``) and feature extractor; ``convs``: the
    encoder's convolutions as (kernel, padding), the last one's stride taking mel frames to encoder frames."""
    mel = LogMelSettings.of(fe)
    if mel.bins != config.num_mel_bins:
        raise ValueError(f"the feature extractor makes {mel.bins} mel bins, the encoder takes {config.num_mel_bins}")
    frames, mel_frames = int(config.max_source_positions), mel.window // mel.hop
    if mel.window % mel.hop or mel_frames % frames:
        raise ValueError(
            f"a window of {mel.window} samples ({mel.seconds:g} s) is {mel.window / mel.hop:g} mel frames of "
            f"{mel.hop} samples, not a whole number of windows of the config's {frames} max_source_positions"
        )
    strides = (1,) * (len(convs) - 1) + (mel_frames // frames,)
    return FrameGeometry(
        mel.sample_rate,
        (mel.n_fft, *(k for k, _ in convs)),
        (mel.hop, *strides),
        (mel.n_fft // 2, *(p for _, p in convs)),
        mel.window,
    )


SEAMLESS_FRAMES = (400, 160)
"""(frame length, hop) in samples of the Kaldi filterbank that ``SeamlessM4TFeatureExtractor`` computes (it
fixes them); it then stacks ``stride`` consecutive frames into one model frame."""


def w2v_bert_geometry(config, fe) -> FrameGeometry:
    """w2v-BERT 2.0: Kaldi frames of 25 ms every 10 ms, ``fe.stride`` of them stacked per model frame."""
    length, hop = SEAMLESS_FRAMES
    if int(fe.stride) * int(fe.num_mel_bins) != int(config.feature_projection_input_dim):
        raise ValueError(
            f"the feature extractor stacks {fe.stride} frames of {fe.num_mel_bins} mel bins, the model takes "
            f"{config.feature_projection_input_dim} features a frame"
        )
    return FrameGeometry(int(fe.sampling_rate), (length, int(fe.stride)), (hop, int(fe.stride)))


def parakeet_geometry(config, fe) -> FrameGeometry:
    """FastConformer: a centred STFT (window ``win_length`` every ``hop_length`` samples; whole hops count),
    then log2(subsampling factor) padded convolutions of stride 2: 8 x 10 ms = 80 ms frames centred at
    ``stride · t``."""
    encoder = getattr(config, "encoder_config", config)
    layers = int(np.log2(encoder.subsampling_factor))
    kernel, stride = int(encoder.subsampling_conv_kernel_size), int(encoder.subsampling_conv_stride)
    if int(fe.feature_size) != int(encoder.num_mel_bins):
        raise ValueError(
            f"the feature extractor makes {fe.feature_size} mel bins, the encoder takes {encoder.num_mel_bins}"
        )
    return FrameGeometry(
        int(fe.sampling_rate),
        (int(fe.win_length), *(kernel,) * layers),
        (int(fe.hop_length), *(stride,) * layers),
        (int(fe.win_length) // 2, *((kernel - 1) // 2,) * layers),
        count="hops",
    )


def computes_features(feature_extractor) -> bool:
    """Whether the feature extractor makes features of the waveform (log-mel, filterbank), which the adapter
    computes batch by batch, rather than a normalised waveform (the wav2vec2 family)."""
    return "input_features" in getattr(feature_extractor, "model_input_names", ())


def normalize_waveform(feature_extractor, wave: np.ndarray) -> np.ndarray:
    """The checkpoint's own waveform normalisation (its feature extractor), float32; a feature extractor that
    computes features (:func:`computes_features`) takes the waveform as it is."""
    fe = feature_extractor
    if computes_features(fe):
        return np.asarray(wave, dtype=np.float32)
    return fe(wave, sampling_rate=fe.sampling_rate, return_tensors="np").input_values[0].astype(np.float32)


def normalizes(feature_extractor) -> bool:
    """Whether the feature extractor normalises each waveform to zero mean and unit variance."""
    return bool(getattr(feature_extractor, "do_normalize", False))


def filterbank(feature_extractor, wave: np.ndarray) -> tuple[np.ndarray, int]:
    """The checkpoint's feature extractor on one utterance: its features [frames, features] (float32) and how
    many of the frames are valid (the rest pad the last one out, as the extractor pads)."""
    fe = feature_extractor
    with np.errstate(invalid="ignore", divide="ignore"):  # a one-frame utterance has no variance (no valid frame)
        out = fe(wave, sampling_rate=fe.sampling_rate, return_tensors="np", return_attention_mask=True)
    return np.asarray(out.input_features[0], dtype=np.float32), int(np.asarray(out.attention_mask[0]).sum())
