"""Tolerances of the floating-point comparisons, each derived from a stated bound, never a constant.

fp32 rounds differently on different CPUs (AVX2, AVX-512, ARM: other GEMM blocking, vector widths and
fused multiply-adds), so a constant tolerance that holds on one CPU fails on another.  ``u`` is the unit
roundoff of the dtype the arithmetic ran in (2⁻²⁴ for float32, 2⁻⁵³ for float64).

SUM_BOUND: a sum of n terms, in any order, is within (n − 1)·u·Σ|x| of its exact value (to first order).

FORWARD_BOUND: an activation of a network is the end of a chain of dot products (the convolutions, the
projections, the attention scores and weighted sums, the FFN's up-projection).  Each product of length K
is within K·u·Σ|x_i w_i| of its exact value whatever the order of its sum.  With P the summed length of
the products on the chain (:func:`forward_path`) and S the scale of the layer's activations (its largest
|a|, standing for Σ|x_i w_i|), one evaluation is within P·u·S of the exact value and two evaluations of
the same network (two CPUs, two batch shapes, two front ends) within 2·P·u·S of each other.  The bound
leaves out how later layers amplify earlier errors; the worst-case K per product (rounding errors grow
like √K in practice) covers that by far on these models: measured at most 23·u·S between three ATen CPU
capabilities (default, AVX2, AVX-512) against bounds of about 1,600·u·S for the tiny HuBERT.
"""

from __future__ import annotations

import numpy as np
import torch

SUM_BOUND = "|fl(sum x) - sum x| <= (n - 1) u sum|x|"
FORWARD_BOUND = "|a - a'| <= 2 P u S (P: summed dot-product lengths on the path, S: the layer's largest |a|)"


def unit_roundoff(dtype) -> float:
    """Half the distance from 1 to the next number of ``dtype`` (torch or numpy)."""
    if isinstance(dtype, torch.dtype):
        return torch.finfo(dtype).eps / 2
    return float(np.finfo(dtype).eps) / 2


def forward_path(config, frames: int) -> list[int]:
    """P of :data:`FORWARD_BOUND` for each FFN layer's activation (in layer order), then for the encoder's
    output, of a wav2vec2-family or Whisper encoder ``config`` on utterances of at most ``frames`` frames."""
    if config.model_type == "whisper":
        hidden, width, layers = config.d_model, config.encoder_ffn_dim, config.encoder_layers
        heads = config.encoder_attention_heads
        front = 3 * config.num_mel_bins + 3 * hidden
    else:
        hidden, width, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
        heads = config.num_attention_heads
        channels = (1, *config.conv_dim)
        front = sum(k * c for k, c in zip(config.conv_kernel, channels)) + channels[-1]
        pos_kernel = getattr(config, "conv_pos_kernel_size", None) or config.num_conv_pos_embeddings
        pos_layers = config.num_conv_pos_embeddings if config.model_type == "data2vec-audio" else 1
        front += pos_layers * pos_kernel * hidden // getattr(config, "num_conv_pos_embedding_groups", 1)
    attention = hidden + hidden // heads + frames + hidden  # query, scores, weighted sum, output projection
    activations = [front + layer * (attention + hidden + width) + attention + hidden for layer in range(layers)]
    return [*activations, activations[-1] + width]


def forward_delta(path, scale, u: float):
    """2·P·u·S: how far two evaluations of the same network may put an activation (:data:`FORWARD_BOUND`)."""
    path = np.asarray(path, dtype=np.float64)
    if np.ndim(scale) > 1:  # per layer, against [L, 1, 1] scales
        path = path.reshape(-1, *[1] * (np.ndim(scale) - 1))
    return 2 * path * u * scale


def layer_scale(max_abs: np.ndarray) -> np.ndarray:
    """S of :data:`FORWARD_BOUND`: each layer's largest |activation| [L, 1, 1] from a store-like
    ``max_abs`` [L, labels, D] (NaN where a label had no tokens)."""
    return np.nanmax(max_abs, axis=(1, 2), keepdims=True)


def moment_tolerances(delta, scale, batch_tokens: int, frames: np.ndarray, u: float) -> dict:
    """Per-cell tolerances of the statistics of two runs whose activations differ by at most ``delta``
    (per layer; e.g. :func:`forward_delta`, 0 for runs of the same forwards), all within ``scale`` S of 0,
    whose moments are fp32 sums of at most ``batch_tokens`` terms each around a shift within S of 0
    (:data:`SUM_BOUND`, terms |a − shift| <= 2S) merged in float64.

    mean: delta + 2n·u·S (n = ``batch_tokens``); var = E[(a − μ)²] moves by at most 2·E|a − μ|·2·delta with
    E|a − μ| <= √var <= S, and its sums of squares (<= 4S² a term, two of them) by 8n·u·S²; max_abs and top
    values: delta; abs_sum: ``frames`` times the mean's."""
    mean = delta + 2 * batch_tokens * u * scale
    return {
        "mean": mean,
        "var": 4 * scale * delta + 8 * batch_tokens * u * scale**2,
        "max_abs": delta + 0 * scale,
        "top_value": delta + 0 * scale,
        "abs_sum": np.asarray(frames, dtype=np.float64)[None, :, None] * mean,
    }


def assert_within(got: np.ndarray, want: np.ndarray, tolerance, name: str, bound: str = FORWARD_BOUND) -> None:
    """``|got - want| <= tolerance`` element-wise (NaN where both are NaN), naming the bound on failure."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{name}: NaN in different places"
    excess = np.nan_to_num(np.abs(got - want)) - np.broadcast_to(tolerance, got.shape)
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (
        f"{name}{list(worst)}: {got[worst]!r} vs {want[worst]!r} differ by more than {bound} allows "
        f"({np.broadcast_to(tolerance, got.shape)[worst]:.3g})"
    )
