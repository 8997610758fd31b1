"""The paper preset: overlap frame labels, the paper's pitch classes and percentiles, the final run dropped."""

import json
import os
from fractions import Fraction

import numpy as np
import pytest
from click.testing import CliRunner
from float64_reference import phone_mid

from neurostat.cli import main
from neurostat.corpus.pitch import assign_bins, percentile_edges
from neurostat.corpus.prepared import PreparedCorpus
from neurostat.engine.tokens import token_mask
from neurostat.frames import label_frames_overlap
from neurostat.phones import PHONES
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


def overlap_loop(starts, ends, ids, cell: float, num_frames: int) -> np.ndarray:
    """The loop over intervals and their cells that ``label_frames_overlap`` was before it was vectorised."""
    out, best = np.full(num_frames, -1, dtype=np.int64), np.zeros(num_frames)
    lo = np.arange(num_frames) * cell
    for start, end, label in zip(starts, ends, ids):
        for t in range(max(int(start // cell), 0), min(int(np.ceil(end / cell)), num_frames)):
            overlap = min(end, lo[t] + cell) - max(start, lo[t])
            if overlap > best[t] + 1e-9:
                best[t], out[t] = overlap, label
    return out


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_overlap_labels_equal_the_loop(seed):
    """Random float boundaries (and boundaries on a 5 ms grid, ties within 1 ns), gaps, negative starts,
    intervals past the last frame, cells with several candidates: the same label everywhere."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        n = int(rng.integers(0, 50))
        on_grid = rng.random() < 0.5
        cuts = np.cumsum(rng.integers(1, 12, n + 1)) * 0.005 if on_grid else np.cumsum(rng.exponential(0.04, n + 1))
        cuts -= rng.random() * 0.03 if rng.random() < 0.2 else 0.0
        keep = rng.random(n) > 0.1
        starts, ends = cuts[:-1][keep], cuts[1:][keep]
        ids = rng.integers(0, 41, len(starts)).astype(np.int16)
        num_frames = int(rng.integers(0, int(cuts[-1] / 0.02) + 4))
        got = label_frames_overlap(starts, ends, ids, 0.02, num_frames)
        np.testing.assert_array_equal(got, overlap_loop(starts, ends, ids, 0.02, num_frames))


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
    meta = PreparedCorpus(tmp_path / "p").meta
    assert meta.frame_labels == "overlap" and meta.pitch.rule == "paper"
    assert meta.pitch.method == "praat"  # given explicitly: the preset does not override it
    assert meta.pitch.quantiles == [0.33, 0.66] and meta.pitch.step_seconds == 0.02
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
    # the corpus was labelled with praat F0, the preset asks for YAAPT: say so instead of mixing them
    assert r.exit_code != 0 and "pitch method praat (wanted yaapt)" in r.output and "frame labels" not in r.output
    r = run(
        main,
        ["collect", "--prepared", str(tmp_path / "p"), "--model", str(tiny_model), "--out", str(tmp_path / "d.zarr")]
        + ["--preset", "paper", "--pitch", "praat"],
    )
    assert r.exit_code == 0, r.output
    attrs = json.loads((tmp_path / "d.zarr" / "zarr.json").read_text())["attributes"]
    assert attrs["statistics"]["drop_final_run"] and attrs["frame_labels"] == "overlap"
    assert attrs["progress"]["tokens"] < kept  # one run fewer per utterance
    info = run(main, ["info", str(tmp_path / "d.zarr")]).output
    assert "frames by overlap" in info and "bins by rule paper at percentiles 33, 66" in info and "dropped" in info


def write_official(folder, source, edit=lambda phones, pitch, gender: None):
    """The official label files of the prepared corpus ``source``, index 0 = silence, 26 = spn."""
    symbols = ["", *[p for p in PHONES if p not in ("sil", "spn")]]
    symbols.insert(26, "spn")
    index = {("sil" if s == "" else s): i for i, s in enumerate(symbols)}
    table = {s: [i, 0] for i, s in enumerate(symbols)}
    phones = {u.id: [index[PHONES[p]] for p in u.phone_frames()] for u in source}
    pitch = {u.id: [-1 if b == 3 else int(b) for b in u.pitch_bins()] for u in source}
    gender = {u.speaker: u.gender for u in source}
    edit(phones, pitch, gender)
    folder.mkdir(exist_ok=True)
    for name, data in (("phones", phones), ("phone_table", table), ("pitch", pitch), ("gender", gender)):
        (folder / f"{name}.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def overlap_corpus(demo_corpus, tmp_path_factory):
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.frames import default_geometry

    out = tmp_path_factory.mktemp("overlap")
    settings = PrepareSettings(default_geometry(), frame_labels="overlap")
    prepare(demo_corpus / "LibriSpeech", "dev-clean", demo_corpus / "alignments", out, settings, progress=False)
    return PreparedCorpus(out)


def test_official_label_files_read_back_exactly(overlap_corpus, demo_corpus, tmp_path):
    from neurostat.compare import compare_labels
    from neurostat.corpus.paperlabels import prepare_paper_labels
    from neurostat.corpus.prepared import PreparedCorpus
    from neurostat.labelspace import LabelSpace

    first, second = overlap_corpus.records[0]["id"], overlap_corpus.records[1]["id"]

    def one_off(phones, pitch, gender):  # official frame counts: one more (dropped), one fewer (unlabelled)
        phones[first].append(phones[first][-1])
        pitch[first].append(-1)
        phones[second].pop()
        pitch[second].pop()

    folder = write_official(tmp_path / "official", overlap_corpus, one_off)
    geo = overlap_corpus.geometry
    meta = prepare_paper_labels(demo_corpus / "LibriSpeech", "dev-clean", folder, tmp_path / "p", geo, progress=False)
    paper = PreparedCorpus(tmp_path / "p")
    assert meta.num_utterances == len(overlap_corpus) and meta.pitch.method == "paper-labels"
    src, got = LabelSpace.of_corpus(overlap_corpus), LabelSpace.of_corpus(paper)
    assert src == got
    for a, b in zip(overlap_corpus, paper):
        expected_phones, expected_joint = a.phone_frames(), src.joint_frames(a)
        if a.id == second:
            expected_phones[-1], expected_joint[-1] = -1, -1
        assert b.phone_frames().tolist() == expected_phones.tolist()
        assert got.joint_frames(b).tolist() == expected_joint.tolist()
        assert b.gender == a.gender and np.isnan(b.f0).all()
    report = compare_labels(overlap_corpus, paper)
    total = sum(u.num_frames for u in overlap_corpus)
    assert f"phones agree on {100 * (total - 1) / total:.1f}%" in report and "12 utterances in both" in report
    r = CliRunner().invoke(main, ["compare-labels", str(overlap_corpus.path), str(tmp_path / "p")])
    assert r.exit_code == 0 and report in r.output


def test_a_shorter_official_pitch_file_is_left_padded_as_the_official_code_does(overlap_corpus, demo_corpus, tmp_path):
    """The real files: pitch lists 0-21 frames shorter than the phone lists; the official pipeline
    (match_phone_s3prl.py) puts ``[-1] * gap`` before them, so class i belongs to phone frame i + gap."""
    from neurostat.corpus.paperlabels import official_pitch, prepare_paper_labels

    gaps = {u.id: (7 * i) % 22 for i, u in enumerate(overlap_corpus)}  # 0, 7, 14, 21, 6, ...

    def shorter(phones, pitch, gender):
        for utt, gap in gaps.items():
            pitch[utt] = pitch[utt][gap:]

    folder = write_official(tmp_path / "official", overlap_corpus, shorter)
    geo = overlap_corpus.geometry
    prepare_paper_labels(demo_corpus / "LibriSpeech", "dev-clean", folder, tmp_path / "p", geo, progress=False)
    unvoiced = len(overlap_corpus.meta.pitch.bins) - 1
    for a, b in zip(overlap_corpus, PreparedCorpus(tmp_path / "p")):
        gap = gaps[a.id]
        expected = a.pitch_bins().copy()
        expected[:gap] = unvoiced  # what the official code's left padding gives these frames
        assert b.pitch_bins().tolist() == expected.tolist(), a.id
    assert max(gaps.values()) == 21
    assert official_pitch(np.array([0, 1, 2]), 2).tolist() == [1, 2]  # a longer list: the ends aligned


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ph, pi, g: ph[next(iter(ph))].__setitem__(0, 99), "uses label index 99, which phone_table.json"),
        (lambda ph, pi, g: ph[next(iter(ph))].extend([0, 0]), "labels for .* model frames \\(more than one off\\)"),
        (lambda ph, pi, g: g.pop(next(iter(g))), "has no gender"),
        (lambda ph, pi, g: pi[next(iter(pi))].__setitem__(0, 5), "pitch class outside -1..2"),
        (
            lambda ph, pi, g: ph[next(iter(ph))].__setitem__(1, [3, 4]),
            "phones.json: utterance [0-9-]+, frame 1: label \\[3, 4\\] is not an integer",
        ),
        (
            lambda ph, pi, g: pi[next(iter(pi))].__setitem__(2, "high"),
            "pitch.json: utterance [0-9-]+, frame 2: label 'high' is not an integer",
        ),
    ],
    ids=["unknown-index", "length", "no-gender", "bad-pitch-class", "nested-frame-label", "string-pitch-label"],
)
def test_malformed_official_files_are_clear_errors(overlap_corpus, demo_corpus, tmp_path, edit, message):
    from neurostat.corpus.paperlabels import PaperLabelsError, prepare_paper_labels

    folder = write_official(tmp_path / "official", overlap_corpus, edit)
    with pytest.raises(PaperLabelsError, match=message):
        prepare_paper_labels(
            demo_corpus / "LibriSpeech", "dev-clean", folder, tmp_path / "p", overlap_corpus.geometry, progress=False
        )


def test_collect_with_the_paper_preset_refuses_a_corpus_labelled_otherwise(prepared, tiny_model, tmp_path):
    """A corpus prepared with the defaults has other labels than the preset's: the run must not mix them."""
    args = ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model), "--out", str(tmp_path / "s.zarr")]
    r = CliRunner().invoke(main, [*args, "--preset", "paper"])
    assert r.exit_code != 0 and not (tmp_path / "s.zarr").exists()
    for difference in ("frame labels centre (wanted overlap)", "pitch rule interval (wanted paper)", "pitch method"):
        assert difference in r.output, r.output
    assert "prepare it with --preset paper" in r.output


# Opt-in: the official repository's own files (never committed: they carry no licence).
# NEUROSTAT_PAPER_LABELS: its info/ folder (the official file names are read as they are);
# NEUROSTAT_LIBRISPEECH: a LibriSpeech root with dev-clean, for the whole import.
OFFICIAL = os.environ.get("NEUROSTAT_PAPER_LABELS")
LIBRISPEECH = os.environ.get("NEUROSTAT_LIBRISPEECH")


def official_tokens(folder) -> dict[str, list[tuple[str, int]]]:
    """The official pipeline's tokens written from its code, apart from neurostat's readers: the middle
    frame of each run of the phone file but the last (get_monophone_mid), its phone name without stress
    digits, and the pitch class at that frame after left-padding the pitch list with -1 by the gap."""
    import re
    from pathlib import Path

    folder = Path(folder)
    phones = json.loads(next(folder.glob("*-framewise-phone-merge-20ms.json")).read_text())
    table = json.loads(next(folder.glob("*-label-merge.json")).read_text())
    pitch = json.loads(next(folder.glob("pitch-discrete-*.json")).read_text())
    name = {entry[0]: re.sub(r"\d", "", symbol) or "sil" for symbol, entry in table.items()}
    out = {}
    for utt, p in phones.items():
        q = [-1] * (len(p) - len(pitch[utt])) + pitch[utt]
        mids, start = [], 0
        for i in range(1, len(p)):
            if p[i] != p[i - 1]:
                mids.append((start + i - 1) // 2)
                start = i
        out[utt] = [(name[p[m]], q[m]) for m in mids]
    return out


def our_tokens(phones: np.ndarray, pitch: np.ndarray) -> list[tuple[str, int]]:
    mask = token_mask(phones, "phone-mid", drop_final_run=True)
    return [(PHONES[phones[i]], int(pitch[i])) for i in np.flatnonzero(mask)]


@pytest.mark.skipif(not OFFICIAL, reason="opt-in: set NEUROSTAT_PAPER_LABELS to the official info/ folder")
def test_the_official_files_read_whole_and_their_tokens_equal_the_official_pipelines():
    from neurostat.corpus.paperlabels import official_pitch, read_paper_labels

    phones, pitch, gender = read_paper_labels(OFFICIAL)
    reference = official_tokens(OFFICIAL)
    assert len(phones) == len(reference) == 2703 and set(pitch) == set(phones)
    differ = [u for u in phones if our_tokens(phones[u], official_pitch(pitch[u], len(phones[u]))) != reference[u]]
    assert not differ, f"{len(differ)} utterances differ, e.g. {differ[:3]}"
    assert {u.split("-")[0] for u in phones} <= set(gender)


@pytest.mark.skipif(
    not (OFFICIAL and LIBRISPEECH), reason="opt-in: set NEUROSTAT_PAPER_LABELS and NEUROSTAT_LIBRISPEECH"
)
def test_prepare_paper_labels_imports_every_official_utterance(tmp_path):
    from neurostat.corpus.paperlabels import prepare_paper_labels
    from neurostat.frames import default_geometry

    prepare_paper_labels(LIBRISPEECH, "dev-clean", OFFICIAL, tmp_path / "p", default_geometry(), progress=False)
    corpus = PreparedCorpus(tmp_path / "p")
    reference = official_tokens(OFFICIAL)
    assert len(corpus) == 2703 and not corpus.skips
    bins = corpus.vocabularies["pitch_bin"]
    differ = []
    for utt in corpus:
        phones, classes = utt.phone_frames(), utt.pitch_bins()
        ours = [(PHONES[phones[i]], int(classes[i]) if bins[classes[i]] != "unvoiced" else -1)
                for i in np.flatnonzero(token_mask(phones, "phone-mid", drop_final_run=True))]  # fmt: skip
        if ours != reference[utt.id]:
            differ.append(utt.id)
    assert not differ, f"{len(differ)} utterances' tokens differ from the official pipeline's, e.g. {differ[:3]}"
