"""MFCC features with deltas, in torch: the targets of HuBERT's first pre-training iteration.

Frames are cut at the model's own geometry (window = the conv front end's receptive field, hop = its
stride), so MFCC frame t describes the same samples as model frame t and needs no resampling.
"""

from __future__ import annotations

import math

import torch


def mel_filterbank(num_mels: int, num_fft: int, sample_rate: int) -> torch.Tensor:
    """Triangular filters on the HTK mel scale, [num_mels, num_fft // 2 + 1]."""

    def mel(hz):
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    edges_mel = torch.linspace(mel(20.0), mel(sample_rate / 2), num_mels + 2, dtype=torch.float64)
    edges = 700.0 * (10 ** (edges_mel / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, num_fft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lo) / (mid - lo)
    falling = (hi - bins[None]) / (hi - mid)
    return torch.clamp(torch.minimum(rising, falling), min=0).float()


def dct_matrix(num_in: int, num_out: int) -> torch.Tensor:
    """Orthonormal DCT-II, [num_in, num_out]."""
    n = torch.arange(num_in, dtype=torch.float64)[:, None]
    k = torch.arange(num_out, dtype=torch.float64)[None]
    basis = torch.cos(math.pi / num_in * (n + 0.5) * k) * math.sqrt(2.0 / num_in)
    basis[:, 0] /= math.sqrt(2.0)
    return basis.float()


def deltas(x: torch.Tensor, width: int = 2) -> torch.Tensor:
    """Regression deltas over time of ``x`` [T, D] (edges repeated)."""
    padded = torch.cat([x[:1].expand(width, -1), x, x[-1:].expand(width, -1)])
    num = sum(
        n * (padded[width + n : width + n + len(x)] - padded[width - n : width - n + len(x)])
        for n in range(1, width + 1)
    )
    return num / (2 * sum(n * n for n in range(1, width + 1)))


def mfcc(
    wave: torch.Tensor, sample_rate: int, window: int, hop: int, num_mels: int = 40, num_ceps: int = 13
) -> torch.Tensor:
    """MFCCs with deltas and delta-deltas, [frames, 3 * num_ceps], for a 1-D float waveform."""
    if len(wave) < window:
        return torch.zeros(0, 3 * num_ceps)
    frames = wave.float().unfold(0, window, hop)
    frames = frames - frames.mean(1, keepdim=True)
    frames = torch.cat([frames[:, :1], frames[:, 1:] - 0.97 * frames[:, :-1]], 1)
    frames = frames * torch.hamming_window(window, periodic=False)
    num_fft = 1 << (window - 1).bit_length()
    power = torch.fft.rfft(frames, n=num_fft).abs() ** 2
    log_mel = torch.log(power @ mel_filterbank(num_mels, num_fft, sample_rate).T + 1e-10)
    ceps = log_mel @ dct_matrix(num_mels, num_ceps)
    d = deltas(ceps)
    return torch.cat([ceps, d, deltas(d)], 1)
