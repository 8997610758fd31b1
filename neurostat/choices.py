"""The values of the enumerated options, in one torch-free home: the library validates its arguments
against these tuples and the command line offers them (``click.Choice``), so the two cannot drift.
Three enumerations live with what they enumerate: token modes (:data:`neurostat.engine.tokens.MODES`),
statistics (:mod:`neurostat.declarations`) and presets (:mod:`neurostat.presets`)."""

from __future__ import annotations

LAYOUTS = ("librispeech", "timit", "lhotse", "manifest")
"""Corpus layouts ``prepare`` reads (and ``synth`` writes): see :mod:`neurostat.corpus.source`."""
UNKNOWN_GENDER = "unknown"
"""The gender label of an utterance whose corpus does not give its speaker's gender (a layout without it, a
manifest row without it): its frames are counted, and ``select --property gender`` leaves them out."""
FRAME_LABELS = ("centre", "overlap")
"""How a model frame gets its phone: the interval at its centre, or the one of largest overlap (the paper)."""
PITCH_METHODS = ("praat", "yaapt")
"""F0 trackers: Praat's autocorrelation (default) or YAAPT (the paper)."""
PITCH_RULES = ("interval", "paper")
"""How an F0 value falls into a bin: ``[e_i, e_{i+1})``, or the paper's ``(e_i, e_{i+1}]``."""
PITCH_ALIGNS = ("time", "paper")
"""How the F0 track meets the model frames: by time, or the paper's left padding."""
LEVELS = ("frame", "utterance")
"""What a label set labels."""
MODEL_DTYPES = ("float32", "float16", "bfloat16", "float64")
"""The dtypes a model is loaded in (float64: exact reference runs, as the tests' torchrun jobs)."""
FRONT_ENDS = ("gemm", "batched", "per-utterance")
"""How the engine runs the conv feature encoder on a padded batch (``auto`` picks one for the device):
channels-last GEMMs, the model's own convolutions on the batch, or the model's modules one utterance at a time."""
BACKENDS = ("torch", "triton", "triton-fused")
"""Statistics backends (``auto`` picks one of them for the device)."""
PRECISIONS = ("fp32", "model")
"""Which activations the statistics of a half-precision run see."""
SELECTION_RULES = ("paper", "entropy")
"""Selection rules: the paper's σ rule or LAPE's entropy rule."""
PRUNE_SCOPES = ("layer", "global")
"""A pruning budget per layer or across layers."""
PRUNE_CRITERIA = ("l1", "l2")
"""The norm of a neuron's weights that ranks it for pruning."""
PROBE_TASKS = ("phone", "phone-type", "gender", "pitch-bin", "log-f0")
"""The probes ``probe`` fits."""
