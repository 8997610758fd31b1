"""The embedded default: the demo corpus, its labels and a small model, built offline in a cache.

Until a trained demo model ships, the default model is a small *random-initialised* HuBERT with the
standard front-end geometry, saved with ``save_pretrained`` (so it is loaded by the real path).  Its
statistics exercise the whole engine but carry no property of speech.
"""

from __future__ import annotations

import os
from pathlib import Path

from .corpus.prepare import PrepareSettings, prepare
from .corpus.synth import synthesize
from .model.adapter import load_geometry
from .model.factory import save_model

DEMO_SUBSET = "dev-clean"
DEMO_NOTE = (
    "model: a small RANDOM-INITIALISED HuBERT (no trained demo model ships yet): the statistics exercise "
    "the engine but carry no property of speech"
)


DEMO_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=512,
    conv_dim=(64,) * 7,
    num_conv_pos_embeddings=32,
    num_conv_pos_embedding_groups=4,
)


def cache_dir() -> Path:
    """Where the embedded default keeps its demo corpus, model and store (``$NEUROSTAT_CACHE``)."""
    return Path(os.environ.get("NEUROSTAT_CACHE", Path.home() / ".cache" / "neurostat")) / "demo"


def build_demo_model(path: str | Path, seed: int = 0) -> Path:
    """Saves a small random HuBERT (4 layers, FFN width 512) and its feature extractor to ``path`` (once)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "preprocessor_config.json").is_file():
        return path
    return save_model(path, "hubert", seed=seed, **DEMO_CONFIG)


def ensure_demo(cache: Path, progress: bool = True) -> tuple[Path, Path]:
    """Builds (once) the demo corpus, prepares it and saves the demo model; returns (prepared dir, model dir)."""
    corpus = cache / "corpus"
    if not (corpus / "LibriSpeech" / "SPEAKERS.TXT").is_file():
        synthesize(corpus, DEMO_SUBSET, progress=progress)
    model = build_demo_model(cache / "model")
    prepared = cache / "prepared"
    prepare(
        corpus / "LibriSpeech",
        DEMO_SUBSET,
        corpus / "alignments",
        prepared,
        PrepareSettings(load_geometry(str(model))),
        progress=progress,
    )
    return prepared, model
