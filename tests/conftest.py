"""Shared fixtures.  The environment must be set before any Triton kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (4 speakers x 3 utterances), built once per test session."""
    from neurostat.corpus.synth import synthesize

    out = tmp_path_factory.mktemp("demo")
    synthesize(out, "dev-clean", num_speakers=4, utterances_per_speaker=3, seed=1, progress=False)
    return out


@pytest.fixture
def corpus_copy(demo_corpus, tmp_path) -> Path:
    """A private copy of the demo corpus that a test may damage."""
    dst = tmp_path / "corpus"
    shutil.copytree(demo_corpus, dst)
    return dst


@pytest.fixture(scope="session")
def prepared(demo_corpus, tmp_path_factory):
    """The demo corpus prepared with the default geometry."""
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.prepared import PreparedCorpus
    from neurostat.frames import default_geometry

    out = tmp_path_factory.mktemp("prepared")
    prepare(
        demo_corpus / "LibriSpeech",
        "dev-clean",
        demo_corpus / "alignments",
        out,
        PrepareSettings(default_geometry()),
        progress=False,
    )
    return PreparedCorpus(out)


def tiny_config_kwargs(**overrides) -> dict:
    """Config arguments of the tiny test models (32 hidden units, standard conv geometry)."""
    kw = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    return {**kw, **overrides}


def save_tiny_model(
    path: Path,
    model_type: str = "hubert",
    stable_layer_norm: bool = False,
    seed: int = 0,
    width: int = 37,
    layers: int = 3,
) -> Path:
    """Saves a tiny random wav2vec2-family model and its feature extractor with save_pretrained."""
    import torch
    from transformers import (
        Data2VecAudioConfig,
        Data2VecAudioModel,
        HubertConfig,
        HubertModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
        WavLMConfig,
        WavLMModel,
    )

    classes = {
        "hubert": (HubertConfig, HubertModel),
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "wavlm": (WavLMConfig, WavLMModel),
        "data2vec-audio": (Data2VecAudioConfig, Data2VecAudioModel),
    }
    config_cls, model_cls = classes[model_type]
    kw = tiny_config_kwargs(num_hidden_layers=layers, intermediate_size=width)
    if stable_layer_norm:
        kw.update(feat_extract_norm="layer", do_stable_layer_norm=True)
    if model_type == "data2vec-audio":
        kw.update(num_conv_pos_embeddings=5, conv_pos_kernel_size=5)
        kw.pop("num_conv_pos_embedding_groups")
    torch.manual_seed(seed)
    model_cls(config_cls(**kw)).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=True).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-hubert"))
