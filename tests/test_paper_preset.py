"""The paper preset: overlap frame labels, the paper's pitch classes and percentiles, the final run dropped."""

import json
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from reference import phone_mid

from neurostat.cli import main
from neurostat.corpus.pitch import assign_bins, percentile_edges
from neurostat.engine.tokens import token_mask
from neurostat.frames import label_frames_overlap
from neurostat.presets import PRESETS, apply_preset


def overlap_reference(intervals: list[tuple[str, str, int]], cell: Fraction, num_frames: int) -> list[int]:
    """Brute force in exact arithmetic: per frame, the interval of largest overlap (earliest on a tie)."""
    out = []
    for t in range(num_frames):
        lo, hi = cell * t, cell * (t + 1)
        best, label = Fraction(0), -1
        for start, end, phone in intervals:
            overlap = min(Fraction(end), hi) - max(Fraction(start), lo)
            if overlap > best:
                best, label = overlap, phone
        out.append(label)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_overlap_labels_match_exact_brute_force(seed):
    rng = np.random.default_rng(seed)
    cell = Fraction(320, 16000)  # 20 ms
    # boundaries on a 5 ms grid: many exactly on grid lines and many exact ties (10 ms + 10 ms in a cell);
    # intervals shorter than a frame; a gap (no interval) now and then
    cuts = np.cumsum(rng.integers(1, 9, 40)) * 5
    intervals, previous = [], 0
    for i, ms in enumerate(cuts):
        if rng.random() < 0.1:
            previous = int(ms)
            continue
        intervals.append((f"{previous / 1000:.3f}", f"{ms / 1000:.3f}", i % 7))
        previous = int(ms)
    num_frames = int(Fraction(int(cuts[-1]), 1000) / cell) + 2
    starts = np.array([float(s) for s, _, _ in intervals])
    ends = np.array([float(e) for _, e, _ in intervals])
    ids = np.array([p for _, _, p in intervals])
    got = label_frames_overlap(starts, ends, ids, 0.02, num_frames)
    assert got.tolist() == overlap_reference(intervals, cell, num_frames)


def test_pitch_classes_on_the_edges_under_both_rules():
    t0, t1 = 129.03, 179.78
    f0 = np.array([100.0, t0, 150.0, t1, 200.0, np.nan])
    assert assign_bins(f0, [t0, t1], "interval").tolist() == [0, 1, 1, 2, 2, 3]
    # the paper: F0 < t0 low, t0 < F0 <= t1 mid, F0 > t1 high; F0 == t0 goes to low (the official code drops it)
    assert assign_bins(f0, [t0, t1], "paper").tolist() == [0, 0, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown pitch rule"):
        assign_bins(f0, [t0, t1], "nearest")


def test_percentile_edges_equal_numpy_percentile():
    rng = np.random.default_rng(0)
    f0 = np.where(rng.random(1001) < 0.3, np.nan, rng.gamma(9, 20, 1001))
    voiced = f0[np.isfinite(f0)]
    np.testing.assert_allclose(percentile_edges(f0, [0.33, 0.66]), np.percentile(voiced, [33, 66]), rtol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_drop_final_run_against_a_plain_loop(seed):
    rng = np.random.default_rng(seed)
    phones = np.repeat(rng.integers(-1, 6, 20), rng.integers(1, 6, 20))
    last_start = max(t for t in range(len(phones)) if t == 0 or phones[t] != phones[t - 1])
    expected = [t for t in phone_mid(phones) if t < last_start]
    assert np.flatnonzero(token_mask(phones, "phone-mid", drop_final_run=True)).tolist() == expected
    every = token_mask(phones, "all", drop_final_run=True)
    assert not every[last_start:].any() and every[:last_start].tolist() == (phones[:last_start] >= 0).tolist()


def test_preset_fills_only_the_options_not_given():
    options = {"pitch": "praat", "frame_labels": "centre", "strict": False}
    got = apply_preset("paper", options, given={"pitch"})
    assert got == {"pitch": "praat", "frame_labels": "overlap", "strict": False}
    assert apply_preset(None, options, set()) == options
    with pytest.raises(ValueError, match="unknown preset"):
        apply_preset("lape", options, set())
    assert PRESETS["paper"]["topk_ratio"] == 0.01


def test_prepare_and_collect_with_the_paper_preset(demo_corpus, tiny_model, tmp_path):
    run = CliRunner().invoke
    root, align = demo_corpus / "LibriSpeech", demo_corpus / "alignments"
    args = ["--root", root, "--subset", "dev-clean", "--alignments", align]
    r = run(main, ["prepare", *map(str, args), "--out", str(tmp_path / "p"), "--preset", "paper", "--pitch", "praat"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["frame_labels"] == "overlap" and meta["pitch"]["rule"] == "paper"
    assert meta["pitch"]["method"] == "praat"  # given explicitly: the preset does not override it
    assert meta["pitch"]["quantiles"] == [0.33, 0.66] and meta["pitch"]["step_seconds"] == 0.02
    assert "labelled by overlap" in r.output
    out = tmp_path / "s.zarr"
    r = run(main, ["collect", "--prepared", str(tmp_path / "p"), "--model", str(tiny_model), "--out", str(out)])
    assert r.exit_code == 0, r.output
    kept = json.loads((out / "zarr.json").read_text())["attributes"]["progress"]["tokens"]
    r = run(
        main,
        ["collect", "--prepared", str(tmp_path / "p"), "--model", str(tiny_model), "--out", str(tmp_path / "d.zarr")]
        + ["--preset", "paper"],
    )
    assert r.exit_code == 0, r.output
    attrs = json.loads((tmp_path / "d.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["statistics"]["drop_final_run"] and attrs["frame_labels"] == "overlap"
    assert attrs["progress"]["tokens"] < kept  # one run fewer per utterance
    info = run(main, ["info", str(tmp_path / "d.zarr")]).output
    assert "frames by overlap" in info and "bins by rule paper at percentiles 33, 66" in info and "dropped" in info
