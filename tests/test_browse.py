"""`neurostat browse`: the static site, rendered in a real headless browser where one is installed (Chromium
from the system packages; `.ci/run` installs it): the index loads and its search filters, a neuron page shows
its profile and <audio> elements whose files decode to the snippet's duration."""

import re
import shutil
import subprocess

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
    sources = re.findall(r'<audio[^>]* src="\.\./audio/([^"]+)"', page)
    top = stats.top_frames(3, 2)
    assert len(sources) == len(top) == 3
    sr = prepared.geometry.sample_rate
    for t, name in zip(top, sources):
        info = sf.info(tmp_path / "site" / "audio" / name)
        length = next(r["num_samples"] for r in prepared.records if r["id"] == t["utterance"]) / sr
        want = min(t["seconds"] + 0.5, length) - max(t["seconds"] - 0.5, 0.0)
        assert info.samplerate == sr and abs(info.duration - want) < 2 / sr
        assert f"{t['utterance']}" in page
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
    sources = re.findall(r'<audio[^>]* src="\.\./audio/([^"]+)"', page)
    assert len(sources) == 3
    assert all(sf.info(tmp_path / "site" / "audio" / s).duration > 0.2 for s in sources)
