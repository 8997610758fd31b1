"""What the file system refuses is one line naming the path and what to do, never a traceback (issue 41,
items 4 and 7)."""

import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from storefactory import SPACE, make_store

from neurostat.cli import main


@pytest.fixture
def read_only(tmp_path):
    """A read-only folder (a read-only bind mount: root writes through file modes)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode:
            pytest.skip("cannot remount read-only here")
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an error escaping the command
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for word in words:
        assert word in errors[0], errors[0]


def test_a_read_only_out_is_one_line_before_any_work(read_only, demo_corpus, prepared, tiny_model, tmp_path):
    store = make_store(tmp_path / "s.zarr", np.full(SPACE.size, 10, np.int64), np.ones((2, SPACE.size, 8), np.int64))
    root, align = demo_corpus / "LibriSpeech", demo_corpus / "alignments"
    commands = {
        "synth": ["synth", str(read_only / "demo"), "--speakers", "1", "--utterances", "1"],
        "prepare": ["prepare", "--root", str(root), "--subset", "dev-clean", "--alignments", str(align)],
        "collect": ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model)],
        "select": ["select", str(store)],
        "report": ["report", str(store)],
        "prune": ["prune", "--model", str(tiny_model), "--keep-ratio", "0.5"],
    }
    for name, args in commands.items():
        out = [] if name == "synth" else ["--out", str(read_only / name)]
        one_line_error(CliRunner().invoke(main, [*args, *out]), str(read_only), "choose another place")


def test_a_cache_variable_that_names_a_file_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("NEUROSTAT_CACHE", str(tmp_path / "file"))
    one_line_error(CliRunner().invoke(main, ["collect"]), "NEUROSTAT_CACHE", "is a file, not a folder")


def test_vague_messages_name_the_file_and_what_to_do(prepared, corpus_copy, tiny_model, tmp_path):
    """A cut-short meta.json, compare-labels of corpora whose frame counts differ, select on a store without
    the statistic it needs (issue 41, item 7)."""
    import shutil

    import soundfile as sf

    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.frames import default_geometry

    broken = tmp_path / "broken"
    shutil.copytree(prepared.path, broken)
    (broken / "meta.json").write_text((broken / "meta.json").read_text()[:200])
    result = CliRunner().invoke(main, ["collect", "--prepared", str(broken), "--model", str(tiny_model)])
    one_line_error(result, f"{broken / 'meta.json'}: not valid JSON", "re-run neurostat prepare")

    def short_of_a_frame(path):  # samples to add for one more frame (400-sample window, 320 hop)
        return 320 - (sf.info(path).frames - 400) % 320

    first = min(sorted((corpus_copy / "LibriSpeech").rglob("*.flac")), key=short_of_a_frame)
    wave, rate = sf.read(first)
    assert short_of_a_frame(first) < 0.75 * 320  # within prepare's one-frame tolerance of the TextGrid
    sf.write(first, np.concatenate([wave, np.zeros(short_of_a_frame(first))]), rate)  # one frame more
    align = corpus_copy / "alignments"
    prepare(corpus_copy / "LibriSpeech", "dev-clean", align, tmp_path / "p", PrepareSettings(default_geometry()),
            progress=False)  # fmt: skip
    result = CliRunner().invoke(main, ["compare-labels", str(prepared.path), str(tmp_path / "p")])
    one_line_error(result, "1 of the 12 utterances in both have other frame counts", first.stem)

    store = make_store(tmp_path / "s.zarr", np.full(SPACE.size, 10, np.int64), None, np.ones((2, SPACE.size, 8), np.int64))
    result = CliRunner().invoke(main, ["select", str(store), "--property", "gender"])
    one_line_error(result, "no 'topk_count'", "`--stat topk`")
