"""Random-initialised models of the supported families, built offline from configs (one home for the
test models, the benchmarks' models, and the demo model's initialisation and random-init twin — the
trained demo model itself ships in ``neurostat/tiny/model``).

``size="tiny"`` is a 32-wide model of a few hundred thousand parameters at most (fast tests): 3 layers with
the standard conv front end geometry for the waveform families, 2 Conformer layers on 16 filterbank bins
for w2v-BERT 2.0 and Parakeet; ``size="base"`` is the family's default config (HuBERT-base geometry: 12
layers x 3072 neurons).  Any config field can be overridden.  Whisper (:func:`whisper_config`,
:func:`whisper_feature_extractor`): ``tiny`` is 64 wide, 2 encoder layers of 96 neurons on 40 mel bins;
``base`` has Whisper-base's sizes (6 layers x 2048 neurons, 80 mel bins, 30 s windows of 1,500 frames).
The classes come from the family table (:mod:`neurostat.model.families`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .families import FAMILIES, WAVEFORM, family_named

TINY = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=37,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
)
TINY_MEL_BINS = 16
"""Filterbank bins of the tiny w2v-BERT 2.0 and Parakeet models' feature extractors."""
TINY_CONFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
TINY_FAMILY = {
    "data2vec-audio": dict(num_conv_pos_embeddings=5, conv_pos_kernel_size=5, num_conv_pos_embedding_groups=None),
    "wav2vec2-conformer": dict(conv_depthwise_kernel_size=5),
    "wav2vec2-bert": dict(
        **TINY_CONFORMER, feature_projection_input_dim=2 * TINY_MEL_BINS, conv_depthwise_kernel_size=5
    ),
    "parakeet": dict(
        **TINY_CONFORMER,
        num_key_value_heads=2,
        conv_kernel_size=5,
        subsampling_conv_channels=8,
        num_mel_bins=TINY_MEL_BINS,
    ),  # fmt: skip
}
"""Each family's tiny config beside :data:`TINY` (the waveform families) or instead of it (the filterbank
families); None removes a field."""
SIZES = ("tiny", "base")
CTC_HEADS = {"parakeet": "ParakeetForCTC"}
"""The CTC model of a family whose name is not its base model's with ``ForCTC`` for ``Model``."""


def _classes(model_type: str):
    """(config class, model class) of a non-Whisper family."""
    import transformers

    if model_type not in FAMILIES or model_type == "whisper":
        known = tuple(k for k in FAMILIES if k != "whisper")
        raise ValueError(f"unknown model type {model_type!r}; choose from {known}")
    family = FAMILIES[model_type]
    family.check_available(model_type)
    model, config, _ = family.classes
    return getattr(transformers, config), getattr(transformers, model)


def model_config(model_type: str = "hubert", size: str = "tiny", stable_layer_norm: bool = False, **overrides):
    """The HF config of a ``size`` model of the family (``stable_layer_norm``: layer-norm front end)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {SIZES}")
    config_cls, _ = _classes(model_type)
    kw: dict = {}
    if size == "tiny":
        kw = dict(TINY) if FAMILIES[model_type].input == WAVEFORM else {}
        kw.update(TINY_FAMILY.get(model_type, {}))
    if stable_layer_norm:
        kw.update(feat_extract_norm="layer", do_stable_layer_norm=True)
    kw = {k: v for k, v in {**kw, **overrides}.items() if v is not None}
    return config_cls(**kw)


def build_model(
    model_type: str = "hubert", size: str = "tiny", seed: int = 0, head: bool = False, **config
) -> nn.Module:
    """A random model (seeded) in eval mode; ``head``: its CTC model (a fine-tuned checkpoint's class, whose
    head collecting leaves out); ``config``: :func:`model_config` arguments."""
    import transformers

    config_cls, model_cls = _classes(model_type)
    cfg = model_config(model_type, size, **config)
    if head:
        name = CTC_HEADS.get(model_type) or family_named(model_type).classes[0].replace("Model", "ForCTC")
        model_cls = getattr(transformers, name)
        if model_type == "parakeet":
            cfg = transformers.ParakeetCTCConfig(encoder_config=cfg.to_dict(), vocab_size=12, pad_token_id=11)
        else:
            cfg.vocab_size = 12
    torch.manual_seed(seed)
    return model_cls(cfg).eval()


def feature_extractor(sample_rate: int = 16000, model_type: str = "hubert"):
    """The family's feature extractor: normalised waveforms at ``sample_rate`` for the waveform families, a
    filterbank of :data:`TINY_MEL_BINS` bins for w2v-BERT 2.0 and Parakeet."""
    import transformers

    family = family_named(model_type)
    if family.input == WAVEFORM:
        return transformers.Wav2Vec2FeatureExtractor(
            sampling_rate=sample_rate, do_normalize=True, return_attention_mask=True
        )
    cls = getattr(transformers, family.classes[2])
    if model_type == "wav2vec2-bert":
        return cls(feature_size=TINY_MEL_BINS, num_mel_bins=TINY_MEL_BINS, sampling_rate=sample_rate)
    return cls(feature_size=TINY_MEL_BINS, sampling_rate=sample_rate)


def save_model(
    path: str | Path, model_type: str = "hubert", size: str = "tiny", seed: int = 0, head: bool = False, **config
) -> Path:
    """Saves :func:`build_model`'s model and its feature extractor with ``save_pretrained`` (so loading
    it goes through the real checkpoint path)."""
    path = Path(path)
    build_model(model_type, size, seed, head, **config).save_pretrained(path)
    feature_extractor(model_type=model_type).save_pretrained(path)
    return path


WHISPER_SIZES = {
    "tiny": dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        num_mel_bins=40,
        max_target_positions=32,
        vocab_size=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=2,
    ),
    "base": dict(
        d_model=512,
        encoder_layers=6,
        decoder_layers=6,
        encoder_attention_heads=8,
        decoder_attention_heads=8,
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
        num_mel_bins=80,
    ),
}


def whisper_config(size: str = "tiny", **overrides):
    """The WhisperConfig of a ``size`` model (:data:`WHISPER_SIZES`); ``max_source_positions`` must match
    the feature extractor's window (:func:`whisper_feature_extractor`: 50 frames a second)."""
    from transformers import WhisperConfig

    if size not in WHISPER_SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {tuple(WHISPER_SIZES)}")
    return WhisperConfig(**{**WHISPER_SIZES[size], **overrides})


def whisper_feature_extractor(size: str = "tiny", chunk_length: int = 30, sample_rate: int = 16000):
    """Whisper's feature extractor for a ``size`` model: log-mel of ``chunk_length``-second windows."""
    from transformers import WhisperFeatureExtractor

    bins = WHISPER_SIZES[size]["num_mel_bins"]
    return WhisperFeatureExtractor(feature_size=bins, sampling_rate=sample_rate, chunk_length=chunk_length)


def save_whisper(
    path: str | Path, size: str = "tiny", seed: int = 0, head: bool = False, chunk_length: int = 30, **config
) -> Path:
    """Saves a random Whisper of ``size`` (a WhisperModel, or with ``head`` a WhisperForConditionalGeneration)
    whose windows are ``chunk_length`` seconds, with its feature extractor; ``config`` overrides fields."""
    import transformers

    fe = whisper_feature_extractor(size, chunk_length)
    frames = fe.nb_max_frames // 2  # WhisperEncoder's second convolution has stride 2
    config = whisper_config(size, **{"max_source_positions": frames, **config})
    torch.manual_seed(seed)
    cls = transformers.WhisperForConditionalGeneration if head else transformers.WhisperModel
    path = Path(path)
    cls(config).eval().save_pretrained(path)
    fe.save_pretrained(path)
    return path
