"""The demo model: a small HuBERT pre-trained by neurostat on synthetic speech, shipped as package data.

``bench/train_tiny_ssl.py`` trains it (:mod:`neurostat.tiny.train`) and writes it to
:func:`shipped_model_dir`; ``neurostat collect`` with no arguments uses it.
"""

from __future__ import annotations

from pathlib import Path

from ..model.checkpoints import DEMO_MODEL_DIR


def shipped_model_dir() -> Path:
    """The folder of the shipped demo model (HF checkpoint: config, fp16 weights, model card)."""
    return DEMO_MODEL_DIR
