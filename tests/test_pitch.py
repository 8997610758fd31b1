import numpy as np
import pytest

from neurostat.corpus.pitch import assign_bins, bin_names, f0_praat, f0_yaapt, percentile_edges

SR = 16000


def tone(freq: float, seconds: float = 1.0, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(2 * np.pi * 2 * freq * t)).astype(np.float32)


@pytest.mark.parametrize("freq", [85.0, 129.0, 180.0, 247.0, 390.0])
def test_praat_on_tones_within_one_percent(freq):
    times = np.arange(0.1, 0.9, 0.02)
    f0 = f0_praat(tone(freq), SR, times, 0.01)
    assert np.isfinite(f0).all()
    assert np.abs(f0 / freq - 1).max() < 0.01


def test_praat_silence_is_unvoiced_and_outside_is_nan():
    wave = np.concatenate([tone(200.0, 0.5), np.zeros(SR // 2, np.float32)])
    f0 = f0_praat(wave, SR, np.array([0.25, 0.8, 5.0]), 0.01)
    assert np.isfinite(f0[0]) and np.isnan(f0[1]) and np.isnan(f0[2])


def test_yaapt_on_a_tone():
    pytest.importorskip("amfm_decompy")
    f0 = f0_yaapt(tone(150.0, 1.5), SR, np.arange(0.3, 1.2, 0.02), 0.01)
    voiced = f0[np.isfinite(f0)]
    assert voiced.size > 0.8 * f0.size
    assert np.abs(np.median(voiced) / 150.0 - 1) < 0.02


def test_bins_follow_half_open_rule():
    edges = [129.03, 179.78]
    f0 = np.array([50.0, 129.02, 129.03, 150.0, 179.779, 179.78, 500.0, np.nan])
    assert assign_bins(f0, edges).tolist() == [0, 0, 1, 1, 1, 2, 2, 3]
    assert bin_names(2) == ["low", "mid", "high", "unvoiced"]
    assert bin_names(1) == ["low", "high", "unvoiced"]
    assert bin_names(4) == ["bin1", "bin2", "bin3", "bin4", "bin5", "unvoiced"]


def test_percentile_edges_split_evenly():
    rng = np.random.default_rng(0)
    f0 = np.concatenate([rng.uniform(80, 300, 3000), [np.nan] * 500])
    edges = percentile_edges(f0, [1 / 3, 2 / 3])
    counts = np.bincount(assign_bins(f0, edges), minlength=4)
    assert counts[3] == 500
    assert abs(counts[0] - 1000) <= 1 and abs(counts[1] - 1000) <= 1 and abs(counts[2] - 1000) <= 1
    with pytest.raises(ValueError, match="no voiced"):
        percentile_edges(np.full(5, np.nan), [0.5])


def test_paper_alignment_left_pads_the_track_as_the_official_code_does(monkeypatch):
    """``paper``: the track's frames in order after ``cells - len(track)`` unvoiced ones; ``time``: read at the
    frame centres.  A fake track of 5 frames (every 20 ms from 10 ms) against 8 cells of 20 ms."""
    import neurostat.corpus.pitch as pitch

    track = (np.arange(5) * 0.02 + 0.01, np.array([100.0, 0.0, 120.0, 130.0, 140.0]))
    monkeypatch.setattr(pitch, "TRACKS", {"praat": lambda wave, sr, step: track, "yaapt": None})
    centres = np.arange(7) * 0.02 + 0.0125  # 7 model frames
    paper = pitch.f0_at("praat", np.zeros(SR), SR, centres, 0.02, align="paper", cells=8)
    np.testing.assert_array_equal(paper, [np.nan, np.nan, np.nan, 100.0, np.nan, 120.0, 130.0])
    by_time = pitch.f0_at("praat", np.zeros(SR), SR, centres, 0.02)
    np.testing.assert_array_equal(by_time, [100.0, np.nan, 120.0, 130.0, 140.0, np.nan, np.nan])
    np.testing.assert_array_equal(pitch.left_padded(np.array([1.0, 2.0, 3.0]), 2), [2.0, 3.0])
    with pytest.raises(ValueError, match="unknown pitch alignment"):
        pitch.f0_at("praat", np.zeros(SR), SR, centres, 0.02, align="nearest")


def test_paper_alignment_needs_one_f0_frame_per_model_frame():
    from neurostat.corpus.prepare import PrepareError, PrepareSettings
    from neurostat.frames import default_geometry

    with pytest.raises(PrepareError, match="needs --pitch-step-ms 20"):
        PrepareSettings.from_options(default_geometry(), pitch_align="paper", pitch_step_ms=10.0)
    settings = PrepareSettings.from_options(default_geometry(), pitch_align="paper", pitch_step_ms=20.0)
    assert settings.key()["pitch_align"] == "paper" and "pitch_align" not in PrepareSettings(default_geometry()).key()
