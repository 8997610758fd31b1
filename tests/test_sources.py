"""Corpus sources: the demo corpus written in every layout prepares to the same labels and collects to the same
statistics; a Lhotse segment of a long recording (and a manifest span) equals the utterance as its own file;
each layout's own rules and bad inputs."""

import gzip
import json
import shutil
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import xarray as xr
from click.testing import CliRunner

from neurostat.choices import LAYOUTS, UNKNOWN_GENDER
from neurostat.cli import main
from neurostat.corpus.audio import write_sphere
from neurostat.corpus.layouts import WrittenCorpus, write_layout
from neurostat.corpus.prepare import PrepareError, PrepareSettings, describe_prepared, prepare
from neurostat.corpus.prepared import PreparedCorpus, prepare_command
from neurostat.corpus.source import CorpusError
from neurostat.corpus.textgrid import Interval, write_textgrid
from neurostat.corpus.timit import read_phn, timit_phone_map
from neurostat.engine.collect import CollectConfig, collect
from neurostat.frames import default_geometry
from neurostat.model.loading import load_adapter
from neurostat.phones import ARPABET, PHONES, PhoneMap
from neurostat.select import SelectionError, property_neurons
from neurostat.stats import open_stats

SUBSET = "dev-clean"
VARIABLES = ("frames", "topk_count", "positive_count", "mean", "var")
try:
    import lhotse
except ImportError:  # a venv without the extra: the Lhotse tests skip, the other layouts are still tested
    lhotse = None
needs_lhotse = pytest.mark.skipif(
    lhotse is None, reason="the lhotse extra (pip install 'neurostat[lhotse]') is missing"
)
WRITTEN = tuple(layout for layout in LAYOUTS if lhotse is not None or layout != "lhotse")


def run(written, out, subset=None, phone_map=None, **options):
    """Prepares a written corpus (``options``: the layout's own, e.g. ``sa=False``)."""
    settings = PrepareSettings(default_geometry(), phone_map=phone_map)
    return prepare(
        written.root, subset or written.subset, written.alignments, out, settings, progress=False,
        layout=written.layout, source_options=options,
    )  # fmt: skip


def rows(corpus: PreparedCorpus) -> list[tuple]:
    """Each utterance's labels (gender, sample count, frame rows, intervals), in an order that ignores ids."""
    out = []
    for record, utt in zip(corpus.records, corpus):
        starts, ends, phones = utt.intervals
        out.append((record["gender"], record["num_samples"], utt.frames.tobytes(), starts.tobytes(), ends.tobytes(),
                    phones.tobytes()))  # fmt: skip
    return sorted(out)


def speakers(corpus: PreparedCorpus) -> list[list[int]]:
    """The utterances' sample counts grouped by speaker: the speaker partition, whatever the ids."""
    groups: dict[str, list[int]] = {}
    for r in corpus.records:
        groups.setdefault(r["speaker"], []).append(r["num_samples"])
    return sorted(sorted(g) for g in groups.values())


@pytest.fixture(scope="module")
def written(demo_corpus, tmp_path_factory):
    """The demo corpus in each layout (the phone boundaries rounded to samples in all four)."""
    base = tmp_path_factory.mktemp("layouts")
    root, align = demo_corpus / "LibriSpeech", demo_corpus / "alignments"
    return {layout: write_layout(root, SUBSET, align, layout, base / layout) for layout in WRITTEN}


@pytest.fixture(scope="module")
def prepared_layouts(written, tmp_path_factory):
    base = tmp_path_factory.mktemp("prepared-layouts")
    for layout, w in written.items():
        run(w, base / layout)
    return {layout: PreparedCorpus(base / layout) for layout in written}


@pytest.fixture(scope="module")
def adapter64(tiny_model):
    return load_adapter(str(tiny_model), dtype=torch.float64)


def collect_store(corpus, adapter, out):
    config = CollectConfig(stats=("topk", "positive", "moments"), tokens="all", batch_seconds=3.0)
    collect(corpus, adapter, out, config, progress=False)
    return xr.open_zarr(out, consolidated=False)


def assert_same_store(a, b):
    """Counts exactly; float64 moments to 1e-10 (a float64 model: the sums differ only by batch order)."""
    for name in VARIABLES:
        if name in ("mean", "var"):
            np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-10, atol=1e-13, equal_nan=True)
        else:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    assert a["frames"].values.sum() > 0


def test_four_layouts_prepare_to_the_same_labels_and_collect_to_the_same_store(prepared_layouts, adapter64, tmp_path):
    base = prepared_layouts["librispeech"]
    assert len(base) == 12 and base.skips == {} and base.meta.genders == ["M", "F"]
    stores = {}
    for layout, corpus in prepared_layouts.items():
        assert corpus.meta.corpus == layout and corpus.meta.lacking == {}
        assert rows(corpus) == rows(base), layout
        assert speakers(corpus) == speakers(base), layout
        assert corpus.edges == base.edges and corpus.meta.num_frames == base.meta.num_frames
        stores[layout] = collect_store(corpus, adapter64, tmp_path / f"{layout}.zarr")
    for layout, store in stores.items():
        assert_same_store(store, stores["librispeech"])
    # TIMIT's phones went through its map (h#, pau, lower case), the others through the ARPAbet rule
    assert prepared_layouts["timit"].meta.phone_map["source"] == "neurostat/data/timit_phones.tsv"


def test_the_written_layouts_hold_the_same_audio(written, demo_corpus):
    timit = sorted(written["timit"].root.rglob("*.WAV"))
    flacs = sorted((demo_corpus / "LibriSpeech").rglob("*.flac"))
    assert len(timit) == len(flacs) == 12
    assert sorted(len(sf.read(f)[0]) for f in flacs) == sorted(
        (p.stat().st_size - 1024) // 2 for p in timit
    )  # 16-bit samples after the 1024-byte header
    phn = read_phn(timit[0].with_suffix(".PHN"))
    assert phn[0][2] == "h#" and phn[-1][2] == "h#" and all(s == s.lower() for _, _, s in phn)


def _long_recordings(prepared_corpus: PreparedCorpus, written_lhotse, out):
    """Each speaker's utterances (from the per-file Lhotse layout) concatenated into one FLAC with gaps of odd
    lengths; a supervision per utterance at its offset, its phones moved onto the long recording's timeline.
    Also a manifest of the same spans with TextGrids on the long files' timelines."""
    sups = {s.id: s for s in lhotse.load_manifest(written_lhotse.root / "supervisions.jsonl.gz")}
    recs = {r.id: r for r in lhotse.load_manifest(written_lhotse.root / "recordings.jsonl.gz")}
    from lhotse.supervision import AlignmentItem

    by_speaker: dict[str, list[str]] = {}
    for r in prepared_corpus.records:
        by_speaker.setdefault(r["speaker"], []).append(r["id"])
    (out / "audio").mkdir(parents=True)
    recordings, supervisions, manifest = [], [], ["id,audio,speaker,gender,textgrid,start,end"]
    for n, (speaker, ids) in enumerate(sorted(by_speaker.items())):
        pieces, offset, phones = [], 0, []
        for k, uid in enumerate(ids):
            gap = np.zeros(1237 + 311 * k + 7 * n, np.int16)  # not on the 320-sample stride
            pieces.append(gap)
            offset += len(gap)
            samples, sr = sf.read(recs[uid].sources[0].source, dtype="int16")
            sup = sups[uid]
            start, items = offset / sr, sup.alignment["phone"]
            moved = [AlignmentItem(i.symbol, (offset + round(i.start * sr)) / sr, i.duration) for i in items]
            supervisions.append(lhotse.SupervisionSegment(
                id=uid, recording_id=f"long-{speaker}", start=start, duration=len(samples) / sr, speaker=speaker,
                gender=sup.gender, alignment={"phone": moved}))  # fmt: skip
            phones += [Interval(i.start, i.end, i.symbol) for i in moved]
            manifest.append(f"{uid},audio/long-{speaker}.flac,{speaker},{sup.gender},long-{speaker}.TextGrid,"
                            f"{start!r},{(offset + len(samples)) / sr!r}")  # fmt: skip
            pieces.append(samples)
            offset += len(samples)
        pieces.append(np.zeros(500, np.int16))
        path = out / "audio" / f"long-{speaker}.flac"
        sf.write(path, np.concatenate(pieces), sr, subtype="PCM_16")
        recordings.append(lhotse.Recording.from_file(path, recording_id=f"long-{speaker}"))
        grid, t = [], 0.0
        for iv in phones:  # silence between the utterances, as a TextGrid of the whole file has it
            if iv.xmin > t:
                grid.append(Interval(t, iv.xmin, ""))
            grid.append(iv)
            t = iv.xmax
        grid.append(Interval(t, (offset + 500) / sr, ""))
        write_textgrid(out / f"long-{speaker}.TextGrid", (offset + 500) / sr, {"phones": grid})
    lhotse.RecordingSet.from_recordings(recordings).to_file(out / "recordings.jsonl.gz")
    lhotse.SupervisionSet.from_segments(supervisions).to_file(out / "supervisions.jsonl.gz")
    (out / "manifest.csv").write_text("\n".join(manifest) + "\n")


@needs_lhotse
def test_a_lhotse_segment_of_a_long_recording_equals_the_utterance_as_its_own_file(
    written, prepared_layouts, adapter64, tmp_path
):
    own = prepared_layouts["lhotse"]
    _long_recordings(own, written["lhotse"], tmp_path / "long")
    prepare(tmp_path / "long", None, None, tmp_path / "p", PrepareSettings(default_geometry()), progress=False,
            layout="lhotse")  # fmt: skip
    segments = PreparedCorpus(tmp_path / "p")
    assert [r["id"] for r in segments.records] == [r["id"] for r in own.records]
    assert all(r["start"] > 0 and r["audio"].endswith(".flac") for r in segments.records)
    assert rows(segments) == rows(own) and speakers(segments) == speakers(own)
    for a, b in zip(segments, own):  # the same samples, cut exactly
        np.testing.assert_array_equal(a.load_audio(), b.load_audio())
    assert_same_store(
        collect_store(segments, adapter64, tmp_path / "seg.zarr"), collect_store(own, adapter64, tmp_path / "own.zarr")
    )
    # the same spans through a CSV manifest: neurostat's own span reader, TextGrids on the long files' timelines
    prepare(tmp_path / "long" / "manifest.csv", None, None, tmp_path / "m", PrepareSettings(default_geometry()),
            progress=False, layout="manifest")  # fmt: skip
    assert rows(PreparedCorpus(tmp_path / "m")) == rows(own)


@needs_lhotse
def test_cuts_manifest_reads_like_recordings_and_supervisions(written, prepared_layouts, tmp_path):
    root = written["lhotse"].root
    cuts = lhotse.CutSet.from_manifests(
        recordings=lhotse.load_manifest(root / "recordings.jsonl.gz"),
        supervisions=lhotse.load_manifest(root / "supervisions.jsonl.gz"),
    )
    (tmp_path / "c").mkdir()
    cuts.to_file(tmp_path / "c" / "demo_cuts_dev.jsonl.gz")  # a recipe's name, found by --subset
    prepare(tmp_path / "c", "dev", None, tmp_path / "p", PrepareSettings(default_geometry()), progress=False,
            layout="lhotse")  # fmt: skip
    assert rows(PreparedCorpus(tmp_path / "p")) == rows(prepared_layouts["lhotse"])
    with pytest.raises(CorpusError, match="no recordings.jsonl.gz .* for --subset test"):
        prepare(tmp_path / "c", "test", None, tmp_path / "q", PrepareSettings(default_geometry()), layout="lhotse")


def _rewrite_jsonl(path, change):
    with gzip.open(path, "rt") as f:
        items = [json.loads(line) for line in f]
    items = [x for x in (change(item) for item in items) if x is not None]
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(x) + "\n" for x in items))
    return items


@needs_lhotse
def test_lhotse_bad_supervisions_alignment_fallback_and_no_gender(written, tmp_path, demo_corpus):
    root = tmp_path / "l"
    shutil.copytree(written["lhotse"].root, root)
    ids = sorted(s.id for s in lhotse.load_manifest(root / "supervisions.jsonl.gz"))

    def change(item):
        item.pop("gender")
        if item["id"] == ids[0]:
            item["duration"] += 0.5  # runs past its recording
        if item["id"] in ids[1:3]:
            del item["alignment"]  # ids[1]: a TextGrid in --alignments; ids[2]: none there
        if item["id"] == ids[3]:
            item["recording_id"] = "nope"
        return item

    _rewrite_jsonl(root / "supervisions.jsonl.gz", change)
    grids = tmp_path / "grids"
    grids.mkdir()
    shutil.copy(next((written["librispeech"].alignments).rglob(f"{ids[1]}.TextGrid")), grids)
    out = tmp_path / "p"
    meta = prepare(root, None, grids, out, PrepareSettings(default_geometry()), progress=False, layout="lhotse")
    skips = {json.loads(line)["id"]: json.loads(line) for line in (out / "skips.jsonl").read_text().splitlines()}
    assert {k: v["reason"] for k, v in skips.items()} == {
        ids[0]: "outside-recording",
        ids[2]: "missing-alignment",
        ids[3]: "unknown-recording",
    }
    assert "not inside recording" in skips[ids[0]]["message"] and "nope" in skips[ids[3]]["message"]
    assert meta.num_utterances == 9 and meta.genders == ["M", "F", UNKNOWN_GENDER]
    assert meta.lacking["gender"].startswith("9 of 9 utterances have no speaker gender")
    assert "lacking gender: 9 of 9" in describe_prepared(meta, out)
    assert {r["gender"] for r in PreparedCorpus(out).records} == {UNKNOWN_GENDER}


def test_without_the_lhotse_package_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lhotse", None)
    with pytest.raises(ImportError, match=r"pip install 'neurostat\[lhotse\]'"):
        prepare(tmp_path / "m", None, None, tmp_path / "p", PrepareSettings(default_geometry()), layout="lhotse")
    assert not (tmp_path / "p").exists()
    assert not (tmp_path / "p").exists()


# -- TIMIT --

TIMIT_61 = (
    "b d g p t k dx q bcl dcl gcl pcl tcl kcl jh ch s sh z zh f th v dh m n ng em en eng nx l r w y hh hv el "
    "iy ih eh ey ae aa aw ay ah ao oy ow uh uw ux er ax ix axr ax-h pau epi h#"
).split()


def test_the_shipped_timit_map():
    assert len(TIMIT_61) == 61
    mapping = timit_phone_map()
    mapped = {s: mapping(s) for s in TIMIT_61}
    assert set(mapped.values()) <= set(PHONES)
    expected = {"ax": "AH", "ix": "IH", "axr": "ER", "ux": "UW", "el": "L", "em": "M", "en": "N", "nx": "N",
                "eng": "NG", "hv": "HH", "dx": "D", "q": "spn", "ax-h": "AH"}  # fmt: skip
    assert {s: mapped[s] for s in expected} == expected
    assert all(mapped[s] == "sil" for s in ("h#", "pau", "epi", "bcl", "dcl", "gcl", "pcl", "tcl", "kcl"))
    named = [s for s in TIMIT_61 if s.upper() in ARPABET]  # ARPAbet-named symbols map to themselves
    assert {s.upper() for s in named} == set(ARPABET) and all(mapped[s] == s.upper() for s in named)
    assert set(mapped.values()) == set(PHONES)


def _timit_copy(written, tmp_path, lower=False):
    root = tmp_path / "timit"
    shutil.copytree(written["timit"].root, root)
    if lower:
        for path in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
            path.rename(path.with_name(path.name.lower()))
    return root


def test_timit_lower_case_names_phone_map_overlay_and_no_sa(written, prepared_layouts, tmp_path):
    root = _timit_copy(written, tmp_path, lower=True)
    speaker = sorted((root / "train" / "dr1").iterdir())[0]
    (speaker / "sx1.wav").rename(speaker / "sa1.wav")
    (speaker / "sx1.phn").rename(speaker / "sa1.phn")
    w = WrittenCorpus("timit", root)
    meta = run(w, tmp_path / "all")
    assert meta.num_utterances == 12 and meta.subset is None and meta.source_options == {}
    assert rows(PreparedCorpus(tmp_path / "all")) == rows(prepared_layouts["timit"])
    ids = [r["id"] for r in PreparedCorpus(tmp_path / "all").records]
    assert f"{speaker.name.upper()}_SA1" in ids and all(i == i.upper() for i in ids)
    meta = run(w, tmp_path / "no-sa", sa=False)
    assert meta.num_utterances == 11 and meta.source_options == {"sa": False}
    command = prepare_command(json.loads((tmp_path / "no-sa" / "meta.json").read_text()), tmp_path / "no-sa")
    assert "--corpus timit" in command and "--no-sa" in command and "--subset" not in command
    assert "--phone-map" not in command and "--alignments" not in command
    # a --phone-map file is laid over the shipped map: only its lines change
    (tmp_path / "flap.tsv").write_text("dx\tT\n")
    phn = speaker / "sx2.phn"
    lines = phn.read_text().splitlines()
    a, b, _ = lines[3].split()
    phn.write_text("\n".join([*lines[:3], f"{a} {b} dx", *lines[4:]]) + "\n")
    for flap in ("D", "T"):
        mapping = PhoneMap.from_file(tmp_path / "flap.tsv") if flap == "T" else None
        run(w, tmp_path / f"flap-{flap}", subset="train", phone_map=mapping)
        corpus = PreparedCorpus(tmp_path / f"flap-{flap}")
        utt = next(u for u in corpus if u.id == f"{speaker.name.upper()}_SX2")
        assert PHONES[utt.intervals[2][3]] == flap
    assert corpus.meta.phone_map["extra"]["dx"] == "T" and corpus.meta.phone_map["extra"]["pau"] == "sil"
    with pytest.raises(CorpusError, match="no TEST folder"):
        run(w, tmp_path / "t", subset="TEST")


def test_timit_bad_inputs_are_one_line_skips_or_errors(written, tmp_path):
    root = _timit_copy(written, tmp_path)
    speaker = sorted((root / "TRAIN" / "DR1").iterdir())[0]
    wavs = sorted(speaker.glob("*.WAV"))
    data = wavs[0].read_bytes()  # an 8-bit SPHERE file
    wavs[0].write_bytes(data[:1024].replace(b"sample_n_bytes -i 2", b"sample_n_bytes -i 1") + data[1024:])
    items = read_phn(wavs[1].with_suffix(".PHN"))  # phones past the audio
    a, _, s = items[-1]
    lines = [f"{x} {y} {z}" for x, y, z in items[:-1]] + [f"{a} {items[-1][1] + 800} {s}"]
    wavs[1].with_suffix(".PHN").write_text("\n".join(lines) + "\n")
    wavs[2].with_suffix(".PHN").unlink()
    out = tmp_path / "p"
    meta = run(WrittenCorpus("timit", root), out)
    skips = {json.loads(line)["id"]: json.loads(line) for line in (out / "skips.jsonl").read_text().splitlines()}
    ids = [f"{speaker.name}_{w.stem}" for w in wavs]
    assert {k: v["reason"] for k, v in skips.items()} == {
        ids[0]: "unsupported-audio",
        ids[1]: "length-mismatch",
        ids[2]: "missing-phn",
    }
    assert "1 byte(s) per sample: neurostat reads 16-bit PCM" in skips[ids[0]]["message"]
    assert "800 past the audio" in skips[ids[1]]["message"] and skips[ids[1]]["file"].endswith(".PHN")
    assert meta.num_utterances == 9
    with pytest.raises(PrepareError, match=r"no .PHN file beside the audio \(--strict; 3 problem"):
        prepare(root, None, None, tmp_path / "s", PrepareSettings(default_geometry(), strict=True), progress=False,
                layout="timit")  # fmt: skip
    speaker.rename(speaker.with_name("XABC0"))
    with pytest.raises(CorpusError, match=r"XABC0: a TIMIT speaker folder is <M\|F>"):
        run(WrittenCorpus("timit", root), tmp_path / "e")
    assert not (tmp_path / "e").exists()  # nothing written


def test_sphere_reader_reads_big_endian_and_refuses_shorten(tmp_path):
    from neurostat.corpus.audio import Skip, load_audio

    samples = np.array([0, 1, -1, 32767, -32768, 1234], np.int16)
    write_sphere(tmp_path / "a.wav", samples, 16000)
    wave, sr, _ = load_audio(tmp_path / "a.wav", 16000)
    np.testing.assert_array_equal(wave, samples / np.float32(32768))
    data = (tmp_path / "a.wav").read_bytes()
    big = data[:1024].replace(b"sample_byte_format -s2 01", b"sample_byte_format -s2 10") + samples.byteswap().tobytes()
    (tmp_path / "b.wav").write_bytes(big)
    np.testing.assert_array_equal(load_audio(tmp_path / "b.wav", 16000)[0], wave)
    shorten = data[:1024].replace(b"sample_coding -s3 pcm", b"sample_coding -s26 pcm,embedded-shorten-v2.00")
    (tmp_path / "c.wav").write_bytes(shorten + data[1024:])
    with pytest.raises(Skip, match="sph2pipe"):
        load_audio(tmp_path / "c.wav", 16000)


# -- manifests --


def test_manifest_csv_and_jsonl_without_gender_and_bad_rows(written, prepared_layouts, tmp_path, adapter64):
    csv_path = written["manifest"].root
    lines = csv_path.read_text().splitlines()
    header, body = lines[0].split(","), [line.split(",") for line in lines[1:]]
    folder = csv_path.parent
    jsonl = folder / "nogender.jsonl"
    jsonl.write_text("".join(json.dumps({k: v for k, v in zip(header, row) if k != "gender"}) + "\n" for row in body))
    out = tmp_path / "p"
    meta = prepare(jsonl, None, None, out, PrepareSettings(default_geometry()), progress=False, layout="manifest")
    assert meta.genders == ["M", "F", UNKNOWN_GENDER] and "no gender column" in meta.lacking["gender"]
    corpus = PreparedCorpus(out)
    assert sorted(r[1:] for r in rows(corpus)) == sorted(r[1:] for r in rows(prepared_layouts["manifest"]))
    # select --property gender names what the corpus lacks; the other properties work
    store = tmp_path / "s.zarr"
    collect_store(corpus, adapter64, store)
    stats = open_stats(store)
    with pytest.raises(
        SelectionError, match="no token has a speaker gender to group by: 12 of 12 utterances .*no gender column"
    ):
        property_neurons(stats, "gender")
    property_neurons(stats, "phone-type")
    res = CliRunner().invoke(main, ["select", str(store), "--property", "gender"])
    assert res.exit_code != 0 and "no gender column" in res.output
    # bad rows: a missing audio file and a row without an alignment are skips; a duplicate id is an error
    (folder / "audio" / f"{body[0][0]}.flac").rename(folder / "moved.flac")
    body[1][4] = ""
    body[2][3] = ""  # no gender in one row only: selection works, with a warning
    csv_path.write_text("\n".join(",".join(row) for row in [header, *body]) + "\n")
    meta = prepare(csv_path, None, None, tmp_path / "q", PrepareSettings(default_geometry()), progress=False,
                   layout="manifest")  # fmt: skip
    assert meta.skips == {"missing-audio": 1, "missing-textgrid": 1} and meta.num_utterances == 10
    skips = [json.loads(line) for line in (tmp_path / "q" / "skips.jsonl").read_text().splitlines()]
    assert f"{csv_path}:2: no such audio file" in skips[0]["message"]
    assert "1 of 10 utterances have no speaker gender" in meta.lacking["gender"]
    csv_path.write_text("\n".join(",".join(row) for row in [header, *body, body[3]]) + "\n")
    with pytest.raises(CorpusError, match=f"{csv_path}:14: duplicate utterance id {body[3][0]} .*:5"):
        prepare(csv_path, None, None, tmp_path / "r", PrepareSettings(default_geometry()), layout="manifest")
    assert not (tmp_path / "r").exists()
    csv_path.write_text("id,audio\nx,y.flac\n")
    with pytest.raises(CorpusError, match="no speaker column"):
        prepare(csv_path, None, None, tmp_path / "r", PrepareSettings(default_geometry()), layout="manifest")
    csv_path.write_text("id,audio,speaker,textgrid,start,end\nx,y.flac,s,t.TextGrid,2.0,1.0\n")
    with pytest.raises(CorpusError, match="0 <= start < end"):
        prepare(csv_path, None, None, tmp_path / "r", PrepareSettings(default_geometry()), layout="manifest")


def test_cli_synth_layouts_prepare_and_collect(tmp_path, tiny_model):
    runner = CliRunner()
    res = runner.invoke(main, ["synth", str(tmp_path / "d"), "--speakers", "2", "--utterances", "1",
                               "--layout", "manifest"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (tmp_path / "d" / "manifest.csv").is_file() and not list(tmp_path.glob("d/.synth-*"))
    command = res.output.splitlines()[-1].removeprefix("next: neurostat ").split()
    res = runner.invoke(main, command)
    assert res.exit_code == 0 and "prepared 2 utterances" in res.output, res.output
    res = runner.invoke(main, ["collect", "--corpus", "manifest", "--root", str(tmp_path / "d" / "manifest.csv"),
                               "--model", str(tiny_model), "--out", str(tmp_path / "s.zarr"), "-j", "0"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert open_stats(tmp_path / "s.zarr").meta.corpus["root"] == str(tmp_path / "d" / "manifest.csv")
    res = runner.invoke(main, ["info", str(tmp_path / "s.zarr")])
    assert f"corpus: {tmp_path / 'd' / 'manifest.csv'} (shard 0/1)" in res.output
    for extra, message in ((["--no-sa"], "takes no option --no-sa"), (["--subset", "x"], "no subsets")):
        res = runner.invoke(main, ["prepare", "--corpus", "manifest", "--root", str(tmp_path / "d" / "manifest.csv"),
                                   *extra])  # fmt: skip
        assert res.exit_code != 0 and message in res.output, res.output
    res = runner.invoke(main, ["prepare", "--corpus", "timit", "--root", str(tmp_path), "--alignments", str(tmp_path)])
    assert res.exit_code != 0 and "leave out --alignments" in res.output
    res = runner.invoke(main, ["prepare", "--root", str(tmp_path)])
    assert res.exit_code != 0 and "--subset and --alignments" in res.output


@needs_lhotse
def test_the_readme_offline_layout_commands_run_as_written(tmp_path, monkeypatch):
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("Try every layout offline") :], re.S).group(1)
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()]
    assert [c[:2] for c in commands] == [["neurostat", "synth"], ["neurostat", "prepare"]] * 3
    monkeypatch.chdir(tmp_path)
    for args in commands:
        res = CliRunner().invoke(main, args[1:])
        assert res.exit_code == 0, (args, res.output)
    for name in ("timit", "lhotse", "csv"):  # synth's TIMIT sentences are all SX: --no-sa leaves none out
        assert len(PreparedCorpus(tmp_path / "mine" / f"prepared-{name}")) == 4
