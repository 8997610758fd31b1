"""The embedded default: the demo corpus, its labels and the shipped demo model, offline.

The model is :mod:`neurostat.tiny`'s small HuBERT, pre-trained by neurostat on synthetic speech (see
its model card); the demo corpus speaks with voice variants and speakers it never heard.  The corpus
and its labels are built once in a cache folder.
"""

from __future__ import annotations

from pathlib import Path

from .corpus.prepare import PrepareSettings, Ranks, prepare
from .corpus.synth import synthesize
from .files import cache_root
from .model.checkpoints import DEMO, model_source
from .model.loading import load_geometry

DEMO_SUBSET = "dev-clean"
DEMO_TOKENS = "all"
"""The demo counts every frame: its corpus is small (minutes of speech), and the paper's one token per
phone would leave most (gender, phone) cells with fewer tokens than D/k, where the selection rule
cannot tell a property neuron from noise."""
DEMO_NOTE = (
    "model: neurostat's demo model, a 4-layer HuBERT pre-trained on synthetic espeak-ng speech (not for "
    "research claims about real speech); corpus: synthetic speakers whose voices it never heard; "
    "tokens: every frame (the corpus is small)"
)


def cache_dir() -> Path:
    """Where the embedded default keeps its demo corpus, labels and store: ``$NEUROSTAT_CACHE/demo-v4``
    (``~/.cache/neurostat/demo-v4`` by default)."""
    return cache_root() / "demo-v4"


def demo_model() -> Path:
    """The shipped demo model's folder (an HF checkpoint)."""
    return Path(model_source(DEMO))


def ensure_demo(cache: Path, progress: bool = True, ranks: Ranks | None = None) -> tuple[Path, Path]:
    """Builds (once) the demo corpus and prepares it for the demo model; returns (prepared dir, model dir).
    With ``ranks`` (torchrun's) rank 0 synthesises the corpus and the ranks prepare it together."""
    corpus = cache / "corpus"
    if (ranks is None or ranks.rank == 0) and not (corpus / "LibriSpeech" / "SPEAKERS.TXT").is_file():
        synthesize(corpus, DEMO_SUBSET, progress=progress)
    if ranks is not None:
        ranks.broadcast(None)  # the corpus is there before any rank scans it
    model = demo_model()
    prepared = cache / "prepared"
    prepare(
        corpus / "LibriSpeech",
        DEMO_SUBSET,
        corpus / "alignments",
        prepared,
        PrepareSettings(load_geometry(str(model))),
        progress=progress,
        ranks=ranks,
    )
    return prepared, model
