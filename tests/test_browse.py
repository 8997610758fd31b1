"""`neurostat browse`: the static site, rendered in a real headless browser where one is installed (Chromium
from the system packages; `.ci/run` installs it): the index loads and its search filters, a neuron page shows
its profile and <audio> elements whose files decode to the snippet's duration."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from neurostat.browse import BrowseError, build_browser
from neurostat.cli import main
from neurostat.engine.collect import CollectConfig, collect
from neurostat.model.loading import load_adapter
from neurostat.stats import open_stats

BROWSER = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="module")
def store(prepared, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("browse") / "s.zarr"
    config = CollectConfig(topk_ratio=0.1, stats=("topk", "top_frames"), top_frames=3)
    collect(prepared, load_adapter(str(tiny_model)), out, config, progress=False)
    return out


def dom(url: str) -> str:
    """The page's DOM after its scripts ran, from headless Chromium."""
    res = subprocess.run(
        [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_site_files_and_snippets(store, prepared, tmp_path):
    (tmp_path / "sel.json").write_text('{"1": [0, 5], "3": [2]}')
    res = CliRunner().invoke(
        main, ["browse", str(store), "--prepared", str(prepared.path), "--neurons", str(tmp_path / "sel.json"),
               "--out", str(tmp_path / "site")]
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    pages = sorted(p.name for p in (tmp_path / "site" / "neurons").iterdir())
    assert pages == ["L1-0.html", "L1-5.html", "L3-2.html"]
    stats = open_stats(store)
    page = (tmp_path / "site" / "neurons" / "L3-2.html").read_text()
    sources = re.findall(r'<audio[^>]* src="\.\./audio/([^"#]+)#t=([0-9.]+),([0-9.]+)"', page)
    top = stats.top_frames(3, 2)
    assert len(sources) == len(top) == 3
    sr = prepared.geometry.sample_rate
    for t, (name, start, end) in zip(top, sources):  # the utterance's file, and the window a media fragment plays
        utt = next(u for u in prepared if u.id == t["utterance"])
        audio, rate = sf.read(tmp_path / "site" / "audio" / name)
        assert name == f"{t['utterance']}.flac" and rate == sr and np.array_equal(audio, utt.load_audio())
        length = utt.record["num_samples"] / sr
        assert float(start) == pytest.approx(max(t["seconds"] - 0.5, 0.0), abs=1e-3)
        assert float(end) == pytest.approx(min(t["seconds"] + 0.5, length), abs=1e-3)
        assert f"{t['utterance']}" in page
    listed = {t["utterance"] for layer, j in ((1, 0), (1, 5), (3, 2)) for t in stats.top_frames(layer, j)}
    assert sorted(f.name for f in (tmp_path / "site" / "audio").iterdir()) == sorted(f"{u}.flac" for u in listed)
    assert f"from {len(listed)} utterances' audio" in res.output  # each utterance once, however many frames
    assert "sel" in page  # the property (file) it belongs to


def test_bad_input(store, prepared, tiny_model, tmp_path):
    plain = tmp_path / "plain.zarr"
    collect(prepared, load_adapter(str(tiny_model)), plain, CollectConfig(topk_ratio=0.1), progress=False)
    with pytest.raises(BrowseError, match="--top-frames"):
        build_browser(plain, prepared.path, tmp_path / "site")
    other = tmp_path / "other"
    shutil.copytree(prepared.path, other)
    manifest = other / "manifest.jsonl"  # a corpus without the store's first utterance
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(
        BrowseError, match=f"lacks 1 of the {len(prepared)} utterances .*first: {prepared.records[0]['id']}"
    ):
        build_browser(store, other, tmp_path / "site2")


def test_another_corpus_with_the_same_utterance_ids_is_refused(store, corpus_copy, tmp_path):
    """The store records the digests of the corpus it counted: a corpus of the same ids but other labels
    would put wrong labels (and, with other audio, wrong sound) beside the neurons."""
    from corpusedit import flip_sex

    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.frames import default_geometry

    def prepared_copy(out):
        root = corpus_copy
        prepare(root / "LibriSpeech", "dev-clean", root / "alignments", out, PrepareSettings(default_geometry()),
                progress=False)  # fmt: skip
        return out

    same = prepared_copy(tmp_path / "same")  # the same corpus prepared elsewhere: the same content
    assert build_browser(store, same, tmp_path / "site")["pages"] > 0
    speaker = open_stats(store).ds["utterance"].values[0].split("-")[0]
    flip_sex(corpus_copy, str(speaker))
    other = prepared_copy(tmp_path / "other")
    refused = r"not the prepared corpus .*\(gender labels: the store's [0-9a-f]{12}, this corpus"
    with pytest.raises(BrowseError, match=refused):
        build_browser(store, other, tmp_path / "site2")


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium; .ci/run installs it)")
def test_in_a_headless_browser_search_filters_and_a_page_plays(store, prepared, tmp_path):
    build_browser(store, prepared.path, tmp_path / "site", sigma=0.5, every=True)
    index = (tmp_path / "site" / "index.html").as_uri()
    whole = dom(index)
    rows = re.findall(r'<tr data-search="([^"]*)"( style="display: none;")?', whole)
    assert len(rows) == 3 * 37 and not any(hidden for _, hidden in rows)
    filtered = dom(index + "#l2%20n7")
    shown = [keys for keys, hidden in re.findall(r'<tr data-search="([^"]*)"( style="display: none;")?', filtered)
             if not hidden]  # fmt: skip
    assert len(shown) == 1 and shown[0].startswith("l2 2/7 n7")
    assert re.search(r'id="shown">1<', filtered)
    page = dom((tmp_path / "site" / "neurons" / "L2-7.html").as_uri())
    assert '<svg id="profile"' in page and page.count("<rect") == len(open_stats(store).label_space.vocab("phone"))
    sources = re.findall(r'<audio[^>]* src="\.\./audio/([^"#]+)#t=', page)
    assert len(sources) == 3
    assert all(sf.info(tmp_path / "site" / "audio" / s).duration > 0.2 for s in sources)


def test_the_prepared_corpus_defaults_to_the_one_the_store_records(store, prepared, tiny_model, tmp_path):
    (tmp_path / "sel.json").write_text('{"2": [1]}')
    res = CliRunner().invoke(
        main, ["browse", str(store), "--neurons", str(tmp_path / "sel.json"), "--out", str(tmp_path / "site")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "site" / "neurons" / "L2-1.html").is_file() and any((tmp_path / "site" / "audio").iterdir())
    moved = tmp_path / "gone"
    shutil.copytree(prepared.path, moved)
    config = CollectConfig(topk_ratio=0.1, stats=("topk", "top_frames"), top_frames=2, layers=[1])
    collect(type(prepared)(moved), load_adapter(str(tiny_model)), tmp_path / "s.zarr", config, progress=False)
    shutil.rmtree(moved)
    with pytest.raises(BrowseError, match=f"names {moved}, which is not there: give .* with --prepared"):
        build_browser(tmp_path / "s.zarr", None, tmp_path / "site2")


def test_audio_file_names_are_safe_and_distinct():
    from neurostat.browse import _file_name

    assert _file_name("1000-2000-0001", set()) == "1000-2000-0001.flac"
    assert _file_name("sess/01 a", set()) == "sess_01_a.flac"
    assert _file_name("sess:01_a", {"sess_01_a.flac"}) == "sess_01_a~2.flac"
