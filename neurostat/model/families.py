"""The encoder families neurostat reads, in one table (:data:`FAMILIES`).

For each family: the transformers classes and the oldest release neurostat reads them with, where the
backbone sits inside task wrappers (``*ForCTC``, pretraining heads), where its layers and their FFNs are
(one entry of the layer axis per FFN), the FFN activation, the input kind (waveform, log-mel windows) and
how the frame geometry follows from the config and the feature extractor.  This module is the only place
that spells transformers' class names and the attribute names of its modules, configs and feature
extractors: the adapters reach every part of a model through a :class:`Family`, so a new family is one
entry here (and, for a new input kind, one adapter file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce

import numpy as np
from torch import nn

from ..frames import FrameGeometry

WAVEFORM, LOG_MEL = "waveform", "log-mel"
"""Input kinds: the normalised waveform (a conv front end in the model) or Whisper's log-mel windows."""


class ModelError(ValueError):
    """A model that cannot be loaded or instrumented; the message names it."""


@dataclass(frozen=True)
class FFNPlace:
    """Where one FFN of an encoder layer is: ``container`` (an attribute path from the layer; "" = the layer
    itself) holds W1 (``up``), the activation (``act``) and W2 (``down``); ``name`` names the entry within its
    layer ("" when the layer has one FFN)."""

    name: str
    container: str
    up: str
    act: str
    down: str


def part(module: nn.Module, path: str):
    """The attribute at the dotted ``path`` of ``module`` ("" = the module itself), None when missing."""
    return reduce(lambda m, a: getattr(m, a, None), [a for a in path.split(".") if a], module)


def set_part(module: nn.Module, path: str, value) -> None:
    """Sets the attribute at the dotted ``path`` of ``module``."""
    *head, last = path.split(".")
    setattr(part(module, ".".join(head)), last, value)


def _version() -> str:
    import transformers

    return transformers.__version__


def waveform_geometry(config, sample_rate: int) -> FrameGeometry:
    """The geometry of a waveform family's config: its conv front end's kernels and strides at ``sample_rate``."""
    return FrameGeometry(
        int(sample_rate), tuple(int(k) for k in config.conv_kernel), tuple(int(s) for s in config.conv_stride)
    )


def _wav2vec2_geometry(config, fe) -> FrameGeometry:
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
    def of(cls, fe, source: str = "model") -> LogMelSettings:
        """The settings of a ``WhisperFeatureExtractor``; a clear error for another feature extractor or one that
        dithers (random features)."""
        missing = [a for a in ("n_fft", "hop_length", "n_samples", "chunk_length", "mel_filters") if not hasattr(fe, a)]
        if missing:
            raise ModelError(
                f"{source}: its feature extractor ({type(fe).__name__}) is not Whisper's (no {', '.join(missing)})"
            )
        if getattr(fe, "dither", 0.0):
            raise ModelError(
                f"{source}: its feature extractor dithers (dither={fe.dither}), which makes the log-mel features "
                "random; save it with dither=0.0"
            )
        return cls(
            int(fe.n_fft), int(fe.hop_length), int(fe.n_samples), float(fe.chunk_length), int(fe.feature_size),
            float(fe.padding_value), np.asarray(fe.mel_filters), int(fe.sampling_rate),
        )  # fmt: skip


def _whisper_geometry(config, fe, convs: tuple[tuple[int, int], ...] = WHISPER_CONVS) -> FrameGeometry:
    """Whisper's geometry from its config (``max_source_positions``) and feature extractor; ``convs``: the
    encoder's convolutions as (kernel, padding), the last one's stride taking mel frames to encoder frames."""
    mel = LogMelSettings.of(fe)
    if mel.bins != config.num_mel_bins:
        raise ModelError(f"the feature extractor makes {mel.bins} mel bins, the encoder takes {config.num_mel_bins}")
    frames, mel_frames = int(config.max_source_positions), mel.window // mel.hop
    if mel.window % mel.hop or mel_frames % frames:
        raise ModelError(
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


@dataclass(frozen=True)
class Family:
    """One family of encoders: see the module docstring.  Paths are dotted attribute paths ("" = the module
    itself): ``backbones`` from the loaded model (tried in order), ``encoder``, ``layers``, ``conv_layers``,
    ``projection`` and ``positional`` from the backbone."""

    key: str
    title: str
    model_types: tuple[str, ...]
    classes: tuple[str, str, str]  # the base model, its config and its feature extractor in transformers
    since: str  # the oldest transformers release neurostat reads the family with
    input: str  # WAVEFORM or LOG_MEL
    frame_ms: str  # the frames, for the README's table
    backbones: tuple[str, ...]
    encoder: str
    layers: str
    ffns: tuple[FFNPlace, ...]
    activation: str  # the config attribute naming the FFN activation
    geometry_of: Callable[[object, object], FrameGeometry]
    conv_layers: str | None = None
    projection: str | None = None
    positional: str | None = None
    convs: tuple[str, ...] = ()  # backbone -> the encoder's own convolutions on log-mel features (Whisper)

    @property
    def ffns_per_layer(self) -> int:
        return len(self.ffns)

    def unavailable(self) -> str | None:
        """Why the installed transformers cannot run this family (it lacks a class), None when it can."""
        import transformers

        missing = [c for c in self.classes if not hasattr(transformers, c)]
        if not missing:
            return None
        return f"{self.title} needs transformers >= {self.since} ({', '.join(missing)}); installed: {_version()}"

    def check_available(self, source: str) -> None:
        """Refuses a family the installed transformers lacks, naming the release it needs."""
        why = self.unavailable()
        if why:
            raise ModelError(f"{source}: {why}; upgrade transformers")

    def find_backbone(self, model: nn.Module, name: str) -> nn.Module:
        """The backbone of ``model`` (itself, or inside a task wrapper): the module holding the encoder."""
        for path in self.backbones:
            candidate = part(model, path)
            if isinstance(candidate, nn.Module) and isinstance(part(candidate, self.layers), nn.ModuleList):
                return candidate
        raise ModelError(f"{name}: cannot find the {self.title} encoder (expected its layers at .{self.layers})")

    def encoder_layers(self, backbone: nn.Module) -> nn.ModuleList:
        return part(backbone, self.layers)

    def run_encoder(self, backbone: nn.Module) -> nn.Module:
        """The module that runs the layer stack on the front end's output."""
        return part(backbone, self.encoder)

    def config_of(self, config):
        """The encoder's own config."""
        return config

    def activation_name(self, config) -> str:
        return str(getattr(self.config_of(config), self.activation))

    def geometry(self, config, fe, source: str = "model") -> FrameGeometry:
        """The frame geometry of the config and feature extractor (no weights needed)."""
        try:
            return self.geometry_of(config, fe)
        except (ModelError, AttributeError, ValueError, TypeError) as e:
            raise ModelError(f"{source}: {e}") from None

    def conv_stack(self, backbone: nn.Module) -> list[tuple[nn.Conv1d, nn.Module | None, Callable]]:
        """The conv feature encoder's layers as (convolution, norm or None, activation)."""
        return [
            (layer.conv, getattr(layer, "layer_norm", None), layer.activation)
            for layer in part(backbone, self.conv_layers)
        ]

    def positional_parts(self, backbone: nn.Module) -> tuple[nn.Module | None, nn.ModuleList | None, nn.Module | None]:
        """(the positional convolution embedding, its stack of conv layers (data2vec-audio) or None, its one
        convolution or None); all None for a family without one."""
        pos = part(backbone, self.positional) if self.positional else None
        return pos, getattr(pos, "layers", None), getattr(pos, "conv", None)

    def projection_of(self, backbone: nn.Module) -> nn.Module:
        """The feature projection between the front end and the encoder."""
        return part(backbone, self.projection)

    def ffn_parts(self, layer: nn.Module, place: FFNPlace) -> tuple[nn.Module, nn.Module, object, nn.Module]:
        """(container, W1, activation, W2) of the FFN at ``place`` in ``layer``."""
        container = part(layer, place.container)
        return container, part(container, place.up), part(container, place.act), part(container, place.down)


WAV2VEC2_FFN = FFNPlace("", "feed_forward", "intermediate_dense", "intermediate_act_fn", "output_dense")
WHISPER_FFN = FFNPlace("", "", "fc1", "activation_fn", "fc2")
FLOOR = "4.56.2"
"""The oldest transformers neurostat reads any family with (pyproject.toml's floor)."""


def _wav2vec2_layout(key: str, title: str, classes: tuple[str, str, str], backbone: str, **kw) -> Family:
    """A family laid out as wav2vec 2.0: waveform in, conv feature encoder, projection, Transformer layers."""
    fields = dict(
        since=FLOOR,
        input=WAVEFORM,
        frame_ms="20 ms (conv front end)",
        backbones=("", backbone),
        encoder="encoder",
        layers="encoder.layers",
        ffns=(WAV2VEC2_FFN,),
        activation="hidden_act",
        geometry_of=_wav2vec2_geometry,
        conv_layers="feature_extractor.conv_layers",
        projection="feature_projection",
        positional="encoder.pos_conv_embed",
    )
    return Family(key, title, (key,), classes, **{**fields, **kw})


FAMILIES: dict[str, Family] = {
    f.key: f
    for f in (
        _wav2vec2_layout("hubert", "HuBERT", ("HubertModel", "HubertConfig", "Wav2Vec2FeatureExtractor"), "hubert"),
        _wav2vec2_layout(
            "wav2vec2", "wav2vec 2.0", ("Wav2Vec2Model", "Wav2Vec2Config", "Wav2Vec2FeatureExtractor"), "wav2vec2"
        ),
        _wav2vec2_layout("wavlm", "WavLM", ("WavLMModel", "WavLMConfig", "Wav2Vec2FeatureExtractor"), "wavlm"),
        _wav2vec2_layout(
            "data2vec-audio",
            "data2vec-audio",
            ("Data2VecAudioModel", "Data2VecAudioConfig", "Wav2Vec2FeatureExtractor"),
            "data2vec_audio",
        ),
        Family(
            key="whisper",
            title="Whisper (encoder)",
            model_types=("whisper",),
            classes=("WhisperModel", "WhisperConfig", "WhisperFeatureExtractor"),
            since=FLOOR,
            input=LOG_MEL,
            frame_ms="20 ms, 30 s windows",
            backbones=("", "model"),
            encoder="encoder",
            layers="encoder.layers",
            ffns=(WHISPER_FFN,),
            activation="activation_function",
            geometry_of=_whisper_geometry,
            convs=("encoder.conv1", "encoder.conv2"),
        ),
    )
}
"""Every supported family by key (its base config's ``model_type``)."""

MODEL_TYPES = tuple(t for f in FAMILIES.values() for t in f.model_types)


def family_of(config, name: str = "model") -> Family:
    """The family of an HF config, or an error naming the model and the supported types; a family the
    installed transformers lacks is refused naming the release it needs."""
    model_type = getattr(config, "model_type", None)
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None:
        raise ModelError(f"{name}: model type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
    family.check_available(name)
    return family


def family_named(name: str) -> Family:
    """The family of a key of :data:`FAMILIES` or a ``model_type`` (no availability check)."""
    family = FAMILIES.get(name) or next((f for f in FAMILIES.values() if name in f.model_types), None)
    if family is None:
        raise ModelError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)}")
    return family


def architecture(config, model: nn.Module) -> str:
    """The checkpoint's class: its config's ``architectures`` (first), else the loaded model's class."""
    names = getattr(config, "architectures", None) or [type(model).__name__]
    return names[0]


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
