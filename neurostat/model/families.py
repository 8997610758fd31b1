"""The encoder families neurostat reads, in one table (:data:`FAMILIES`).

For each family: the transformers classes and the oldest release neurostat reads them with, where the
backbone sits inside task wrappers (``*ForCTC``, pretraining heads), where its layers and their FFNs are
(one entry of the layer axis per FFN: a Conformer layer has two, ffn1 then ffn2), the FFN activation, the
input kind (waveform, log-mel windows, filterbank frames) and which reader of :mod:`~neurostat.model.inputs`
gives its frame geometry from the config and the feature extractor.  With those readers, this module is the
only place that spells transformers' class names and the attribute names of its modules, configs and
feature extractors: the adapters reach every part of a model through a :class:`Family`, so a new family is
one entry here (and, for a new input kind, one adapter file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce

from torch import nn

from ..frames import FrameGeometry
from .inputs import parakeet_geometry, w2v_bert_geometry, wav2vec2_geometry, whisper_geometry

WAVEFORM, LOG_MEL, FILTERBANK = "waveform", "log-mel", "filterbank"
"""Input kinds: the normalised waveform (a conv front end in the model), Whisper's log-mel windows, or a
feature extractor's filterbank frames of the whole utterance (w2v-BERT 2.0, FastConformer)."""


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


class ModelError(ValueError):
    """A model that cannot be loaded or instrumented; the message names it."""


def _version() -> str:
    import transformers

    return transformers.__version__


@dataclass(frozen=True)
class Family:
    """One family of encoders: see the module docstring.  Paths are dotted attribute paths ("" = the module
    itself): ``backbones`` from the loaded model (tried in order), ``encoder``, ``layers``, ``conv_layers``,
    ``projection`` and ``positional`` from the backbone, ``conformer_conv`` from an encoder layer."""

    key: str
    title: str
    model_types: tuple[str, ...]
    classes: tuple[str, str, str]  # the base model, its config and its feature extractor in transformers
    since: str  # the oldest transformers release neurostat reads the family with
    input: str  # WAVEFORM, LOG_MEL or FILTERBANK
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
    conformer_conv: str | None = None  # a Conformer convolution that HF lets read padded frames
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
        """The encoder's own config (a Parakeet CTC checkpoint keeps it inside the wrapper's)."""
        return getattr(config, "encoder_config", None) or config

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

    def conformer_convs(self, backbone: nn.Module) -> list[nn.Module]:
        """Each Conformer layer's depthwise convolution that must not read padded frames (none elsewhere)."""
        if not self.conformer_conv:
            return []
        return [part(layer, self.conformer_conv) for layer in self.encoder_layers(backbone)]

    def projection_of(self, backbone: nn.Module) -> nn.Module:
        """The feature projection between the front end and the encoder."""
        return part(backbone, self.projection)

    def ffn_parts(self, layer: nn.Module, place: FFNPlace) -> tuple[nn.Module, nn.Module, object, nn.Module]:
        """(container, W1, activation, W2) of the FFN at ``place`` in ``layer``."""
        container = part(layer, place.container)
        return container, part(container, place.up), part(container, place.act), part(container, place.down)


WAV2VEC2_FFN = FFNPlace("", "feed_forward", "intermediate_dense", "intermediate_act_fn", "output_dense")
WAV2VEC2_CONFORMER_FFNS = tuple(
    FFNPlace(n, n, "intermediate_dense", "intermediate_act_fn", "output_dense") for n in ("ffn1", "ffn2")
)
WHISPER_FFN = FFNPlace("", "", "fc1", "activation_fn", "fc2")
PARAKEET_FFNS = tuple(FFNPlace(f"ffn{i}", f"feed_forward{i}", "linear1", "activation", "linear2") for i in (1, 2))
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
        geometry_of=wav2vec2_geometry,
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
        _wav2vec2_layout(
            "unispeech", "UniSpeech", ("UniSpeechModel", "UniSpeechConfig", "Wav2Vec2FeatureExtractor"), "unispeech"
        ),
        _wav2vec2_layout(
            "unispeech-sat",
            "UniSpeech-SAT",
            ("UniSpeechSatModel", "UniSpeechSatConfig", "Wav2Vec2FeatureExtractor"),
            "unispeech_sat",
        ),
        _wav2vec2_layout(
            "wav2vec2-conformer",
            "Wav2Vec2-Conformer",
            ("Wav2Vec2ConformerModel", "Wav2Vec2ConformerConfig", "Wav2Vec2FeatureExtractor"),
            "wav2vec2_conformer",
            ffns=WAV2VEC2_CONFORMER_FFNS,
            positional=None,  # its encoder holds a positional convolution that its forward never runs
            conformer_conv="conv_module.depthwise_conv",
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
            geometry_of=whisper_geometry,
            convs=("encoder.conv1", "encoder.conv2"),
        ),
        Family(
            key="wav2vec2-bert",
            title="w2v-BERT 2.0",
            model_types=("wav2vec2-bert",),
            classes=("Wav2Vec2BertModel", "Wav2Vec2BertConfig", "SeamlessM4TFeatureExtractor"),
            since=FLOOR,
            input=FILTERBANK,
            frame_ms="20 ms (2 stacked 10 ms filterbank frames)",
            backbones=("", "wav2vec2_bert"),
            encoder="encoder",
            layers="encoder.layers",
            ffns=WAV2VEC2_CONFORMER_FFNS,
            activation="hidden_act",
            geometry_of=w2v_bert_geometry,
            projection="feature_projection",
        ),
        Family(
            key="parakeet",
            title="Parakeet / FastConformer",
            model_types=("parakeet_encoder", "parakeet_ctc"),
            classes=("ParakeetEncoder", "ParakeetEncoderConfig", "ParakeetFeatureExtractor"),
            since="4.57",
            input=FILTERBANK,
            frame_ms="80 ms (8x subsampled 10 ms filterbank)",
            backbones=("", "encoder"),
            encoder="",
            layers="layers",
            ffns=PARAKEET_FFNS,
            activation="hidden_act",
            geometry_of=parakeet_geometry,
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
