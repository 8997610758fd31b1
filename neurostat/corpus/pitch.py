"""F0 at the model's frame centres, and pitch bins at corpus percentiles.

Praat's autocorrelation method (parselmouth) is the default; YAAPT (amfm-decompy, the paper's
choice, ~20x slower) is optional.  Both run on their own frame grid (half the model's stride by
default).  Alignment ``time`` (the default) reads the track at the model frame centres by nearest
analysis frame; ``paper`` does what the official code does: the track's values in order, left-padded
(unvoiced) up to the utterance's ``int(duration / stride)`` cells, the first of them for the model's
frames — exact only when the track's step is the model's stride.  Unvoiced frames are NaN.

Bins: with edges e_1 < ... < e_{n-1} (e_0 = -inf, e_n = +inf), a voiced value f falls in bin i when
e_i <= f < e_{i+1} (rule ``interval``, neurostat's default) or when e_i < f <= e_{i+1} (rule ``paper``:
the paper's classes F0 < t0, t0 < F0 <= t1, F0 > t1, with F0 == t0 put in the low class — the official
code drops such a frame, which shifts the rest of its utterance).  Either way every value has exactly
one bin; unvoiced frames get their own.
"""

from __future__ import annotations

import numpy as np

from ..choices import PITCH_ALIGNS, PITCH_METHODS, PITCH_RULES

F0_MIN, F0_MAX = 71.0, 800.0
UNVOICED = "unvoiced"


def _nearest(track_times: np.ndarray, track: np.ndarray, times: np.ndarray, step: float) -> np.ndarray:
    out = np.full(len(times), np.nan)
    if len(track_times) == 0:
        return out
    idx = np.rint((times - track_times[0]) / step).astype(np.int64)
    ok = (idx >= 0) & (idx < len(track))
    out[ok] = track[idx[ok]]
    out[out <= 0] = np.nan
    return out


def praat_track(wave: np.ndarray, sample_rate: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Praat autocorrelation F0: (frame times in s, F0 in Hz, 0 where unvoiced)."""
    import parselmouth

    sound = parselmouth.Sound(np.asarray(wave, dtype=np.float64), sampling_frequency=sample_rate)
    pitch = sound.to_pitch_ac(time_step=step, pitch_floor=F0_MIN, pitch_ceiling=F0_MAX)
    return np.asarray(pitch.xs()), np.asarray(pitch.selected_array["frequency"])


def yaapt_track(wave: np.ndarray, sample_rate: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """YAAPT F0: (frame times in s, F0 in Hz, 0 where unvoiced).  Needs the ``paper`` extra."""
    try:
        import amfm_decompy.basic_tools as basic
        import amfm_decompy.pYAAPT as pyaapt
    except ImportError as e:
        raise RuntimeError("--pitch yaapt needs amfm-decompy: pip install 'neurostat[paper]'") from e
    signal = basic.SignalObj(np.asarray(wave, dtype=np.float64), sample_rate)
    pitch = pyaapt.yaapt(signal, f0_min=F0_MIN, f0_max=F0_MAX, frame_space=step * 1000.0)
    return np.asarray(pitch.frames_pos, dtype=np.float64) / sample_rate, np.asarray(pitch.samp_values)


TRACKS = {"praat": praat_track, "yaapt": yaapt_track}


def f0_praat(wave: np.ndarray, sample_rate: int, times: np.ndarray, step: float) -> np.ndarray:
    """Praat autocorrelation F0 (Hz) at ``times`` (s); NaN where unvoiced."""
    return _nearest(*praat_track(wave, sample_rate, step), times, step)


def f0_yaapt(wave: np.ndarray, sample_rate: int, times: np.ndarray, step: float) -> np.ndarray:
    """YAAPT F0 (Hz) at ``times`` (s); NaN where unvoiced.  Needs the ``paper`` extra."""
    return _nearest(*yaapt_track(wave, sample_rate, step), times, step)


def f0_at(
    method: str, wave: np.ndarray, sample_rate: int, times: np.ndarray, step: float, align: str = "time", cells: int = 0
) -> np.ndarray:
    """F0 (Hz, NaN unvoiced) for the frames centred at ``times``: with ``align`` ``time`` the track read
    there, with ``paper`` its values left-padded up to ``cells`` and the first ``len(times)`` of them."""
    if method not in PITCH_METHODS:
        raise ValueError(f"unknown pitch method {method!r}; choose one of {PITCH_METHODS}")
    if align not in PITCH_ALIGNS:
        raise ValueError(f"unknown pitch alignment {align!r}; choose one of {PITCH_ALIGNS}")
    track_times, track = TRACKS[method](wave, sample_rate, step)
    if align == "time":
        return _nearest(track_times, track, times, step)
    values = np.where(track > 0, track, np.nan).astype(np.float64)
    return left_padded(values, cells)[: len(times)]


def left_padded(track: np.ndarray, cells: int) -> np.ndarray:
    """``track`` after ``cells − len(track)`` unvoiced (NaN) values — the official code's alignment of a
    pitch track shorter than the phone labels; a longer one keeps its last ``cells`` values."""
    gap = cells - len(track)
    return np.concatenate([np.full(gap, np.nan), track]) if gap >= 0 else track[-gap:]


def percentile_edges(f0: np.ndarray, quantiles: list[float]) -> list[float]:
    """Bin edges at corpus percentiles of the voiced values (``quantiles`` in (0, 1); the same as
    ``np.percentile`` at 100 x quantiles)."""
    voiced = f0[np.isfinite(f0)]
    if voiced.size == 0:
        raise ValueError("no voiced frames in the corpus: cannot compute pitch bin edges")
    return [float(e) for e in np.quantile(voiced, quantiles)]


def bin_names(num_edges: int) -> list[str]:
    """Names of the voiced bins followed by ``unvoiced``."""
    n = num_edges + 1
    names = {1: ["voiced"], 2: ["low", "high"], 3: ["low", "mid", "high"]}.get(n) or [f"bin{i + 1}" for i in range(n)]
    return names + [UNVOICED]


def assign_bins(f0: np.ndarray, edges: list[float], rule: str = "interval") -> np.ndarray:
    """Bin index per value by ``rule`` (see the module docstring), ``len(edges) + 1`` for unvoiced."""
    if rule not in PITCH_RULES:
        raise ValueError(f"unknown pitch rule {rule!r}; choose from {PITCH_RULES}")
    side = "right" if rule == "interval" else "left"
    out = np.searchsorted(np.asarray(edges, dtype=np.float64), f0, side=side).astype(np.int64)
    out[~np.isfinite(f0)] = len(edges) + 1
    return out
