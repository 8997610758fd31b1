import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.corpus.librispeech import CorpusError
from neurostat.corpus.prepare import PrepareError, PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus, PreparedCorpusError, read_utterance_file, write_utterance_file
from neurostat.corpus.textgrid import Interval, read_textgrid, write_textgrid
from neurostat.frames import default_geometry
from neurostat.labelspace import LabelSpace
from neurostat.phones import PHONES, PhoneMap

SUBSET = "dev-clean"


def run(corpus, out, **kw):
    settings = PrepareSettings(default_geometry(), **kw)
    return prepare(corpus / "LibriSpeech", SUBSET, corpus / "alignments", out, settings, progress=False)


def files(corpus, n=0):
    flacs = sorted((corpus / "LibriSpeech" / SUBSET).rglob("*.flac"))
    flac = flacs[n]
    tg = corpus / "alignments" / SUBSET / flac.parent.parent.name / flac.parent.name / f"{flac.stem}.TextGrid"
    return flac, tg


def skips(out):
    return {json.loads(line)["id"]: json.loads(line) for line in (out / "skips.jsonl").read_text().splitlines()}


def test_prepared_corpus_api(prepared, demo_corpus):
    assert len(prepared) == 12 and prepared.skips == {}
    assert prepared.meta.pitch.bins == ["low", "mid", "high", "unvoiced"]
    lo, hi = prepared.edges
    assert 80 < lo < hi < 300
    space = LabelSpace.of_corpus(prepared)
    assert space.size == len(PHONES) * 2 * 4
    for utt in prepared:
        phones = utt.phone_frames()
        assert len(phones) == utt.num_frames == len(utt.f0) == len(utt.pitch_bins())
        assert (phones >= 0).all()
        joint = space.joint_frames(utt)
        names = space.names()
        assert set(names["gender"][joint]) == {utt.gender}
        # labels by frame centre, checked against the TextGrid directly
        grid = read_textgrid(next((demo_corpus / "alignments").rglob(f"{utt.id}.TextGrid")))
        centres = prepared.geometry.centres(utt.num_frames)
        for t in (0, utt.num_frames // 2, utt.num_frames - 1):
            iv = next(i for i in grid.tiers["phones"] if i.xmin <= centres[t] < i.xmax)
            assert PHONES[phones[t]] == PhoneMap()(iv.text)
        assert len(utt.load_audio()) == utt.record["num_samples"]
    male = np.concatenate([u.f0 for u in prepared if u.gender == "M"])
    female = np.concatenate([u.f0 for u in prepared if u.gender == "F"])
    assert np.nanmedian(male) < lo and np.nanmedian(female) > hi


def test_second_run_is_cached(corpus_copy, tmp_path, monkeypatch):
    out = tmp_path / "p"
    run(corpus_copy, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "utts").iterdir()}
    import neurostat.corpus.prepare as mod

    calls = []
    monkeypatch.setattr(mod, "f0_at", lambda *a, **k: calls.append(a) or pytest.fail("recomputed"))
    meta = run(corpus_copy, out)
    assert meta.num_utterances == 12 and not calls
    assert stamps == {p.name: p.stat().st_mtime_ns for p in (out / "utts").iterdir()}
    monkeypatch.undo()
    flac, _ = files(corpus_copy, 3)
    wave, sr = sf.read(flac)
    sf.write(flac, wave * 0.5, sr)
    run(corpus_copy, out)
    changed = [n for n, t in stamps.items() if (out / "utts" / n).stat().st_mtime_ns != t]
    assert changed == [f"{flac.stem}.utt"]


def test_a_cache_file_gives_back_what_was_written(tmp_path):
    rng = np.random.default_rng(7)
    arrays = {
        "starts": rng.random(13),
        "phone": rng.integers(-5, 40, 13).astype(np.int16),
        "f0": rng.random((0,)).astype(np.float32),  # an empty track
        "grid": rng.random((3, 5)).astype(">f4"),  # another byte order, two axes
    }
    record = {"id": "a.b", "speaker": "ß", "num_frames": 3}
    write_utterance_file(tmp_path / "a.b.utt", "k" * 40, record, arrays)
    key, got_record, got = read_utterance_file(tmp_path / "a.b.utt")
    assert (key, got_record) == ("k" * 40, record) and list(got) == list(arrays)
    for name, array in arrays.items():
        assert got[name].dtype == array.dtype and np.array_equal(got[name], array)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.b.utt"]


def test_a_cache_file_that_is_not_one_is_a_value_error(tmp_path):
    path = tmp_path / "u.utt"
    write_utterance_file(path, "k", {"id": "u"}, {"a": np.arange(3), "b": np.ones(2, np.float32)})
    good = path.read_bytes()
    size = int.from_bytes(good[:8], "little")
    header = json.loads(good[8 : 8 + size])
    broken = {
        "cut short": good[:-1],
        "bytes after the arrays": good + b"\0",
        "arrays as a list": json.dumps({**header, "arrays": list(header["arrays"].values())}).encode(),
        "an offset that is not the packed one": json.dumps(
            {**header, "arrays": {**header["arrays"], "b": ["<f4", [2], 16]}}
        ).encode(),
        "no key": json.dumps({"record": {}, "arrays": {}}).encode(),
        "not JSON": b"\xff" * 20,
    }
    for what, data in broken.items():
        if what not in ("cut short", "bytes after the arrays", "not JSON"):
            data = len(data).to_bytes(8, "little") + data + good[8 + size :]
        path.write_bytes(data)
        with pytest.raises(ValueError):
            read_utterance_file(path)
            pytest.fail(what)


def test_an_earlier_neurostats_cache_is_reused_and_a_broken_file_redone(corpus_copy, tmp_path, monkeypatch):
    """After an upgrade, the ``utts/<id>.npz`` files an earlier neurostat wrote are read (nothing is labelled
    again, the folder is the same); a cache file cut short is labelled again; a stopped run's temporary files
    are removed when prepare starts."""
    import neurostat.corpus.prepare as prepare_module

    out = tmp_path / "p"
    run(corpus_copy, out)
    utts = out / "utts"
    want = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "meta.json"}
    for path in sorted(utts.glob("*.utt")):  # the cache as neurostat wrote it before 2026-12-06
        key, record, arrays = read_utterance_file(path)
        np.savez(utts / f"{record['id']}.npz", key=key, record=json.dumps(record), **arrays)
        path.unlink()
    first = sorted(utts.glob("*.npz"))[0]
    monkeypatch.setattr(prepare_module, "f0_at", lambda *a, **k: pytest.fail("labelled again"))
    run(corpus_copy, out)
    got = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "meta.json"}
    assert got == want and not list(utts.glob("*.utt"))
    monkeypatch.undo()

    first.write_bytes(first.read_bytes()[:50])
    (utts / "x.utt.123.tmp").write_bytes(b"")
    run(corpus_copy, out)
    redone = utts / first.name.replace(".npz", ".utt")
    assert redone.is_file() and not first.exists()  # labelled again, the earlier file gone
    assert not list(utts.glob("*.tmp"))


def test_missing_corpus_and_subset(corpus_copy, tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        prepare(
            tmp_path / "nope", SUBSET, corpus_copy / "alignments", tmp_path / "o", PrepareSettings(default_geometry())
        )
    with pytest.raises(CorpusError, match="subset 'test-other' not found"):
        prepare(
            corpus_copy, "test-other", corpus_copy / "alignments", tmp_path / "o", PrepareSettings(default_geometry())
        )


def test_duplicate_utterance_ids(corpus_copy, tmp_path):
    flac, _ = files(corpus_copy)
    other = flac.parent.parent / "999"
    other.mkdir()
    shutil.copy(flac, other / flac.name)
    with pytest.raises(CorpusError, match=f"duplicate utterance id {flac.stem}"):
        run(corpus_copy, tmp_path / "o")


def _damage_audio(corpus):
    """Every way a FLAC can be bad, one utterance each; returns {id: expected reason}."""
    expected = {}
    flac, _ = files(corpus, 0)
    flac.write_bytes(b"fLaC this is not really flac")
    expected[flac.stem] = "corrupt-audio"
    flac, _ = files(corpus, 1)
    sf.write(flac, np.zeros(0, np.float32), 16000)
    expected[flac.stem] = "empty-audio"
    flac, _ = files(corpus, 2)
    sf.write(flac, np.zeros(300, np.float32), 16000)
    expected[flac.stem] = "too-short"
    flac, _ = files(corpus, 3)
    wave, sr = sf.read(flac)
    sf.write(flac, np.stack([wave, wave], 1), sr)
    expected[flac.stem] = "multichannel-audio"
    return expected


def _damage_labels(corpus):
    expected = {}
    _, tg = files(corpus, 4)
    tg.unlink()
    expected[tg.stem] = "missing-textgrid"
    _, tg = files(corpus, 5)
    tg.write_text("this is not a TextGrid")
    expected[tg.stem] = "bad-textgrid"
    _, tg = files(corpus, 6)
    tg.write_text(tg.read_text().replace('name = "phones"', 'name = "segments"'))
    expected[tg.stem] = "no-phones-tier"
    _, tg = files(corpus, 7)
    grid = read_textgrid(tg)
    phones = grid.tiers["phones"]
    phones[2] = Interval(phones[2].xmin - 0.01, phones[2].xmax, phones[2].text)
    write_textgrid(tg, grid.xmax, grid.tiers)
    expected[tg.stem] = "bad-textgrid"
    _, tg = files(corpus, 8)
    grid = read_textgrid(tg)
    grid.tiers["phones"][3] = Interval(grid.tiers["phones"][3].xmin, grid.tiers["phones"][3].xmax, "QX")
    write_textgrid(tg, grid.xmax, grid.tiers)
    expected[tg.stem] = "unknown-phone"
    flac, tg = files(corpus, 9)
    wave, sr = sf.read(flac)
    sf.write(flac, wave[: len(wave) - int(0.1 * sr)], sr)
    expected[tg.stem] = "length-mismatch"
    flac, tg = files(corpus, 10)
    wave, sr = sf.read(flac)
    sf.write(flac, np.concatenate([wave, np.zeros(int(0.1 * sr))]), sr)
    expected[tg.stem] = "length-mismatch"
    return expected


def test_bad_inputs_are_recorded_skips(corpus_copy, tmp_path):
    expected = {**_damage_audio(corpus_copy), **_damage_labels(corpus_copy)}
    out = tmp_path / "o"
    meta = run(corpus_copy, out)
    got = skips(out)
    assert {k: v["reason"] for k, v in got.items()} == expected
    assert meta.num_utterances == 12 - len(expected)
    assert sum(meta.skips.values()) == len(expected)
    for uid, rec in got.items():
        assert uid in rec["file"] and rec["message"]
    assert "after the audio" in got[files(corpus_copy, 9)[0].stem]["message"]
    assert "before the audio" in got[files(corpus_copy, 10)[0].stem]["message"]
    assert "QX" in got[files(corpus_copy, 8)[0].stem]["message"]
    assert "overlapping" in got[files(corpus_copy, 7)[0].stem]["message"]
    assert "downmix" in got[files(corpus_copy, 3)[0].stem]["message"]


def test_a_corpus_in_another_phone_set_points_at_phone_map(corpus_copy, tmp_path):
    for tg in (corpus_copy / "alignments").rglob("*.TextGrid"):
        grid = read_textgrid(tg)
        ipa = [Interval(iv.xmin, iv.xmax, "ɪ" if iv.text else "") for iv in grid.tiers["phones"]]
        write_textgrid(tg, grid.xmax, {**grid.tiers, "phones": ipa})
    with pytest.raises(PrepareError, match="12 of 12 use phone symbols outside ARPAbet.*--phone-map"):
        run(corpus_copy, tmp_path / "o")


def test_strict_turns_skips_into_errors(corpus_copy, tmp_path):
    _damage_audio(corpus_copy)
    with pytest.raises(PrepareError, match="corrupt|decode"):
        run(corpus_copy, tmp_path / "o", strict=True)


def test_unknown_speaker_is_skipped(corpus_copy, tmp_path):
    spk = corpus_copy / "LibriSpeech" / "SPEAKERS.TXT"
    lines = spk.read_text().splitlines()
    dropped = lines.pop(2).split("|")[0].strip()
    spk.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o"
    meta = run(corpus_copy, out)
    assert meta.skips == {"unknown-speaker": 3}
    assert all(r["reason"] == "unknown-speaker" and dropped in r["message"] for r in skips(out).values())


def test_other_sample_rate_is_resampled_or_refused(corpus_copy, tmp_path):
    flac, _ = files(corpus_copy, 0)
    import soxr

    wave, sr = sf.read(flac, dtype="float32")
    sf.write(flac, soxr.resample(wave, sr, 22050), 22050)
    meta = run(corpus_copy, tmp_path / "o")
    assert meta.resampled == 1 and meta.skips == {}
    rec = next(r for r in PreparedCorpus(tmp_path / "o").records if r["id"] == flac.stem)
    assert rec["source_sample_rate"] == 22050 and rec["resampled"]
    assert abs(rec["num_samples"] - len(wave)) <= 1
    with pytest.raises(PrepareError, match="22050 Hz"):
        run(corpus_copy, tmp_path / "o2", strict=True)


def test_given_edges_and_bins(corpus_copy, tmp_path):
    meta = run(corpus_copy, tmp_path / "o", edges=(150.0,))
    assert meta.pitch.edges == [150.0] and meta.pitch.bins == ["low", "high", "unvoiced"]


def test_not_a_prepared_corpus(tmp_path):
    with pytest.raises(PreparedCorpusError, match="neurostat prepare"):
        PreparedCorpus(tmp_path)


def test_cli_synth_and_prepare(tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        main, ["synth", str(tmp_path / "d"), "--speakers", "2", "--utterances", "2", "--subset", "dev-other"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        main,
        [
            "prepare",
            "--corpus",
            "librispeech",
            "--root",
            str(tmp_path / "d" / "LibriSpeech"),
            "--subset",
            "dev-other",
            "--alignments",
            str(tmp_path / "d" / "alignments"),
            "--out",
            str(tmp_path / "p"),
            "-j",
            "2",
            "--pitch-bins",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "prepared 4 utterances" in res.output
    assert PreparedCorpus(tmp_path / "p").meta.pitch.bins == ["low", "high", "unvoiced"]
    res = runner.invoke(
        main, ["prepare", "--root", str(tmp_path / "d"), "--subset", "nope", "--alignments", str(tmp_path / "d")]
    )
    assert res.exit_code != 0 and "subset 'nope' not found" in res.output


def test_flat_alignment_folder_and_other_geometry(corpus_copy, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for tg in (corpus_copy / "alignments").rglob("*.TextGrid"):
        shutil.copy(tg, flat / tg.name)
    out = tmp_path / "o"
    prepare(corpus_copy / "LibriSpeech", SUBSET, flat, out, PrepareSettings(default_geometry()), progress=False)
    corpus = PreparedCorpus(out)
    assert len(corpus) == 12
    from neurostat.frames import FrameGeometry

    utt = corpus[0]
    half = FrameGeometry(16000, (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 1))  # 10 ms frames
    fine = utt.phone_frames(half)
    assert len(fine) == half.num_frames(utt.record["num_samples"]) > 1.9 * utt.num_frames
    np.testing.assert_array_equal(fine[::2][: utt.num_frames], utt.phone_frames())  # same centres at even frames


def test_prepare_imports_no_torch_where_the_geometry_is_known(corpus_copy, tmp_path):
    """`neurostat prepare` with the default geometry, in a fresh interpreter and under torchrun's
    environment of one process: torch (seconds of imports) is never loaded."""
    import os
    import subprocess
    import sys

    args = ["prepare", "--root", str(corpus_copy), "--subset", SUBSET, "--alignments", str(corpus_copy / "alignments")]
    for world in ({}, {"WORLD_SIZE": "1", "RANK": "0"}):
        code = (
            "import sys; from neurostat.cli import main; "
            f"main({args + ['--out', str(tmp_path / 'p')]!r}, standalone_mode=False); "
            "print('torch imported:', 'torch' in sys.modules)"
        )
        env = {**os.environ, "NEUROSTAT_CACHE": str(tmp_path / "cache"), **world}
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "prepared 12 utterances" in res.stdout and res.stdout.rstrip().endswith("torch imported: False")
