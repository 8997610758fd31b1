"""Model adapters for the wav2vec2 family in HF transformers (HuBERT, wav2vec 2.0, WavLM, data2vec).

The adapter finds the backbone inside task wrappers (``*ForCTC``, pretraining heads), exposes each
layer's FFN pieces (W1, b1, act, W2), runs batches without padding bias, and instruments the FFNs so
the engine sees ``a = act(W1 x + b1)`` as it is computed, without a second GEMM.

Batching: base models' group-norm front end changes its output when an utterance is padded, so the
convolutional front end and the feature projection run per utterance; so does the positional
convolution (data2vec-audio stacks several with layer norms, which padding would leak into).  The
Transformer layers run on the padded batch with a boolean frame mask, which keeps every utterance's
activations equal to its own unpadded forward within float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..frames import FrameGeometry, default_geometry

MODEL_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")
_BACKBONE_ATTRS = ("hubert", "wav2vec2", "wavlm", "data2vec_audio")


class ModelError(ValueError):
    """A model that cannot be loaded or instrumented; the message names it."""


@dataclass
class FFN:
    """One layer's feed-forward block: ``out = W2 · act(W1 · x + b1) + b2``."""

    module: nn.Module
    up: nn.Linear
    act: Callable[[torch.Tensor], torch.Tensor]
    down: nn.Linear

    @property
    def width(self) -> int:
        return self.up.out_features


def check_model_type(config, name: str) -> None:
    """A config of a supported model family, or an error naming the model and the supported types."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ModelError(f"{name}: model type {model_type!r} is not supported (supported: {', '.join(MODEL_TYPES)})")


def normalize_waveform(feature_extractor, wave: np.ndarray) -> np.ndarray:
    """The checkpoint's own waveform normalisation (its feature extractor), float32."""
    fe = feature_extractor
    return fe(wave, sampling_rate=fe.sampling_rate, return_tensors="np").input_values[0].astype(np.float32)


def _backbone(model: nn.Module, name: str) -> nn.Module:
    if getattr(model, "config", None) is not None:
        check_model_type(model.config, name)
    if hasattr(model, "encoder") and hasattr(model, "feature_extractor"):
        return model
    for attr in _BACKBONE_ATTRS:
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module) and hasattr(inner, "encoder"):
            return inner
    raise ModelError(f"{name}: cannot find the speech encoder (expected a .encoder and a .feature_extractor)")


def _ffns(backbone: nn.Module, name: str) -> list[FFN]:
    layers = getattr(backbone.encoder, "layers", None)
    if layers is None or len(layers) == 0:
        raise ModelError(f"{name}: the encoder has no .layers")
    out = []
    for i, layer in enumerate(layers):
        ff = getattr(layer, "feed_forward", None)
        up, act, down = (getattr(ff, a, None) for a in ("intermediate_dense", "intermediate_act_fn", "output_dense"))
        if not (isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and callable(act)):
            raise ModelError(
                f"{name}: layer {i + 1} has no FFN with intermediate_dense / intermediate_act_fn / output_dense"
            )
        out.append(FFN(ff, up, act, down))
    return out


class ModelAdapter:
    """A loaded wav2vec2-family model, ready for instrumented, padding-safe batched forwards."""

    def __init__(self, model: nn.Module, feature_extractor, source: str = "<in-memory>", revision: str | None = None):
        self.source, self.revision = source, revision
        self.model = model.eval()
        self.backbone = _backbone(model, source)
        self.ffns = _ffns(self.backbone, source)
        self.feature_extractor = feature_extractor
        self.config = self.backbone.config
        self.geometry = FrameGeometry.from_config(self.config, feature_extractor.sampling_rate)

    @classmethod
    def load(
        cls,
        source: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
    ) -> "ModelAdapter":
        """Loads a hub id or a local directory (the checkpoint must include its feature-extractor config)."""
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        try:
            config = AutoConfig.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as e:
            where = "directory" if Path(source).exists() else "hub id (offline runs need it in the HF cache)"
            raise ModelError(f"cannot load model {source!r} as a {where}: {e}") from None
        check_model_type(config, source)
        try:
            feature_extractor = AutoFeatureExtractor.from_pretrained(source, revision=revision)
        except (OSError, ValueError) as e:
            raise ModelError(
                f"{source}: no feature-extractor config (preprocessor_config.json), needed for the sample "
                f"rate and waveform normalisation: {e}"
            ) from None
        model = AutoModel.from_pretrained(source, revision=revision, dtype=dtype)
        return cls(model.to(device), feature_extractor, source, revision or getattr(config, "_commit_hash", None))

    def check_geometry(self, geometry: FrameGeometry) -> None:
        """A prepared corpus's frame geometry must be this model's (else its frame labels are wrong)."""
        if geometry != self.geometry:
            raise ModelError(
                f"{self.source}: frame geometry {self.geometry.describe()} differs from the prepared corpus "
                f"({geometry.describe()}); re-run prepare with --model {self.source}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.ffns)

    @property
    def width(self) -> int:
        widths = {f.width for f in self.ffns}
        if len(widths) != 1:
            raise ModelError(f"{self.source}: layers have different FFN widths {sorted(widths)}")
        return widths.pop()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def describe(self) -> dict:
        return {
            "model": self.source,
            "revision": self.revision,
            "model_type": self.config.model_type,
            "num_layers": self.num_layers,
            "width": self.width,
            "hidden_size": self.config.hidden_size,
            "activation": str(self.config.hidden_act),
            "geometry": self.geometry.to_dict(),
            "normalize": bool(getattr(self.feature_extractor, "do_normalize", False)),
        }

    def normalize(self, wave: np.ndarray) -> np.ndarray:
        """The checkpoint's own waveform normalisation (its feature extractor)."""
        return normalize_waveform(self.feature_extractor, wave)

    @torch.inference_mode()
    def encode(self, waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the model on normalised waveforms; returns (last hidden state [B, T, H], frame mask [B, T]).

        Front end per utterance, Transformer batched with a boolean mask (see module docstring).
        """
        feats = []
        for w in waves:
            x = self.backbone.feature_extractor(w.to(self.device, self.dtype)[None]).transpose(1, 2)
            proj = self.backbone.feature_projection(x)
            feats.append((proj[0] if isinstance(proj, tuple) else proj)[0])
        lengths = [f.shape[0] for f in feats]
        hidden = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        mask = (
            torch.arange(hidden.shape[1], device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None]
        )
        pos = self.backbone.encoder.pos_conv_embed
        batched = pos.forward

        def per_utterance(h: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(h)
            for b, n in enumerate(lengths):
                out[b, :n] = batched(h[b : b + 1, :n])[0]
            return out

        pos.forward = per_utterance
        try:
            out = self.backbone.encoder(hidden, attention_mask=mask)
        finally:
            pos.forward = batched
        return out[0], mask

    @contextmanager
    def instrument(
        self, activation: Callable[[int, FFN, torch.Tensor], torch.Tensor], layers: list[int] | None = None
    ) -> Iterator[None]:
        """Within the block, each chosen layer's FFN gets ``a = activation(layer_index, ffn, x)`` — which
        must return ``act(W1 x + b1)`` [B, T, D] — and then finishes exactly as HF does."""
        chosen = range(self.num_layers) if layers is None else layers
        saved = []
        for i in chosen:
            ffn = self.ffns[i]
            saved.append((ffn.module, ffn.module.forward))
            ffn.module.forward = _instrumented_forward(ffn, i, activation)
        try:
            yield
        finally:
            for module, forward in saved:
                module.forward = forward

    def observe(self, sink: Callable[[int, torch.Tensor], None], layers: list[int] | None = None):
        """Instrumentation that only looks: ``sink(layer_index, a)`` sees each FFN activation."""

        def activation(index: int, ffn: FFN, x: torch.Tensor) -> torch.Tensor:
            a = ffn.act(ffn.up(x))
            sink(index, a)
            return a

        return self.instrument(activation, layers)


def _instrumented_forward(ffn: FFN, index: int, activation: Callable[[int, FFN, torch.Tensor], torch.Tensor]):
    module = ffn.module

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        a = activation(index, ffn, hidden_states)
        return module.output_dropout(ffn.down(module.intermediate_dropout(a)))

    return forward


def resolve_device(device: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_geometry(source: str | None = None, sample_rate: int | None = None) -> FrameGeometry:
    """Frame geometry of a model from its config and feature-extractor config alone (``None``: the
    wav2vec2/HuBERT default), at ``sample_rate`` when given."""
    from transformers import AutoConfig, AutoFeatureExtractor

    if source is None:
        geometry = default_geometry()
    else:
        try:
            config = AutoConfig.from_pretrained(source)
            fe = AutoFeatureExtractor.from_pretrained(source)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot read the config of model {source!r}: {e}") from None
        geometry = FrameGeometry.from_config(config, fe.sampling_rate)
    if sample_rate is not None and sample_rate != geometry.sample_rate:
        geometry = FrameGeometry(sample_rate, geometry.conv_kernel, geometry.conv_stride)
    return geometry


def save_feature_extractor(source: str, out: str | Path) -> bool:
    """Copies a checkpoint's feature-extractor config into ``out``; False when it has none."""
    from transformers import AutoFeatureExtractor

    try:
        AutoFeatureExtractor.from_pretrained(source).save_pretrained(out)
    except (OSError, ValueError):
        return False
    return True


def load_full_model(source: str, revision: str | None = None) -> nn.Module:
    """The checkpoint with its own head (the class its config names, e.g. HubertForCTC), for editing."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {source!r}: {e}") from None
    check_model_type(config, source)
    names = getattr(config, "architectures", None) or []
    cls = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), transformers.AutoModel)
    return cls.from_pretrained(source, revision=revision).eval()


def model_ffns(model: nn.Module) -> list[FFN]:
    """The FFNs of a supported model (any wrapper), layer order."""
    name = getattr(model, "name_or_path", "model")
    return _ffns(_backbone(model, name), name)
