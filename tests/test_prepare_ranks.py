"""``prepare`` as a torchrun job (every rank labels a share; the folder one process writes, byte for byte), its
one-writer lock (refusal naming the holder, a dead holder's lock taken over, the job holding it as a whole),
a job whose rank is killed leaving an unfinished folder that the next run resumes, and a folder stopped while
its final files were written."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_distributed import ENV, free_port, torchrun

from neurostat.cli import main
from neurostat.corpus.labelsets import attach_label_set
import neurostat.corpus.prepare as prepare_module
from neurostat.corpus.prepare import OneProcess, PrepareSettings, default_prepare_jobs, prepare
from neurostat.corpus.prepared import (
    LOCK,
    PREVIOUS_META,
    FrameLabels,
    PrepareLock,
    PrepareLockedError,
    PreparedCorpus,
    PreparedCorpusError,
)
from neurostat.engine.collect import CollectConfig, collect_corpus
from neurostat.frames import default_geometry

SUBSET = "dev-clean"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """16 synthetic utterances (4 speakers x 4)."""
    from neurostat.corpus.synth import synthesize

    out = tmp_path_factory.mktemp("ranks-corpus")
    synthesize(out, SUBSET, num_speakers=4, utterances_per_speaker=4, seed=5, progress=False)
    return out


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory) -> Path:
    """The corpus prepared by one process."""
    out = tmp_path_factory.mktemp("one") / "prepared"
    prepare(*sources(corpus), out, PrepareSettings(default_geometry()), progress=False)
    return out


def sources(corpus: Path) -> tuple[Path, str, Path]:
    return corpus / "LibriSpeech", SUBSET, corpus / "alignments"


def prepare_args(corpus: Path, out: Path) -> list:
    root, subset, alignments = sources(corpus)
    return ["--root", root, "--subset", subset, "--alignments", alignments, "--out", out]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a prepared folder (the cache included) by its path in the folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_folder(got: Path, want: Path) -> None:
    a, b = folder_bytes(got), folder_bytes(want)
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert PreparedCorpus(got).meta.num_utterances == 16 and (got / LOCK).read_text() == ""


def test_lock_refuses_a_second_writer_and_takes_over_a_dead_ones(corpus, one_process, tmp_path, tiny_model):
    out = tmp_path / "p"
    with PrepareLock(out) as lock:
        assert lock.taken_over is None and (out / LOCK).read_text() == f"pid {os.getpid()} on {os.uname().nodename}"
        with pytest.raises(PrepareLockedError, match=f"is being prepared by pid {os.getpid()} on "):
            prepare(*sources(corpus), out, PrepareSettings(default_geometry()), progress=False)
        res = CliRunner().invoke(main, ["prepare", *map(str, prepare_args(corpus, out))])
        assert res.exit_code == 1 and f"being prepared by pid {os.getpid()}" in res.output
        root, subset, alignments = sources(corpus)
        with pytest.raises(PrepareLockedError, match=f"pid {os.getpid()}"):  # the prepare inside collect
            collect_corpus(
                str(tiny_model), tmp_path / "s.zarr", CollectConfig(stats=("topk",)), prepared=out, root=root,
                subset=subset, alignments=alignments, progress=False,
            )  # fmt: skip
        assert not (out / "utts").exists() and not (tmp_path / "s.zarr").exists()
    assert (out / LOCK).read_text() == ""  # released: free again
    (out / LOCK).write_text("pid 4194999 on elsewhere")  # a holder that died: text left, no flock
    res = CliRunner().invoke(main, ["prepare", *map(str, prepare_args(corpus, out))])
    assert res.exit_code == 0, res.output
    assert "taking over the lock of pid 4194999 on elsewhere" in res.output
    assert_same_folder(out, one_process)


def test_two_ranks_prepare_the_folder_one_process_writes(corpus, one_process, tmp_path, tiny_model):
    """``collect --root`` under torchrun: the ranks label (the job's bar counts all 16), rank 0 writes the folder,
    the one a single process writes."""
    out = tmp_path / "p"
    with PrepareLock(out):  # the job as a whole is refused: rank 0's word reaches rank 1
        res = subprocess.run(
            torchrun(2, "-m", "neurostat", "prepare", *prepare_args(corpus, out), port=free_port()),
            env=ENV, capture_output=True, text=True, cwd=ROOT,
        )  # fmt: skip
    refusal = f"is being prepared by pid {os.getpid()}"
    assert res.returncode != 0 and res.stderr.count(refusal) == 2, res.stderr[-3000:]  # each rank says it
    root, subset, alignments = sources(corpus)
    args = ["collect", "--root", root, "--subset", subset, "--alignments", alignments, "--prepared", out]
    args += ["--model", tiny_model, "--stat", "topk", "--batch-seconds", 8, "-j", 0, "--out", tmp_path / "s.zarr"]
    res = subprocess.run(
        torchrun(2, "-m", "neurostat", *args, port=free_port()), env=ENV, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "prepare dev-clean (2 ranks): 100%" in res.stderr and "prepared 16 utterances" in res.stdout
    assert_same_folder(out, one_process)


@pytest.mark.parametrize(
    "cores, utterances, size, local_size, want",
    [
        (2, 1024, 1, 1, 2),  # every core
        (16, 1024, 4, 2, 8),  # the machine's cores shared by its 2 processes
        (3, 1024, 2, 2, 1),  # at least one
        (16, 40, 1, 1, 2),  # at most one per 16 utterances
        (16, 40, 2, 1, 1),  # ... of this process's share
        (8, 3, 1, 1, 1),
    ],
)
def test_default_prepare_jobs(monkeypatch, cores, utterances, size, local_size, want):
    monkeypatch.setattr(prepare_module, "usable_cores", lambda: cores)
    ranks = OneProcess()
    ranks.size, ranks.local_size = size, local_size
    assert default_prepare_jobs(utterances, ranks) == want


def test_the_default_workers_label_the_folder_one_process_writes(corpus, one_process, tmp_path, monkeypatch):
    """Without -j, the cores' workers (here 3, one per 5 of the 16 utterances) write what one process writes, and
    the bar says how many there were."""
    monkeypatch.setattr(prepare_module, "usable_cores", lambda: 3)
    monkeypatch.setattr(prepare_module, "UTTERANCES_PER_WORKER", 5)
    res = CliRunner().invoke(main, ["prepare", *map(str, prepare_args(corpus, tmp_path / "p"))])
    assert res.exit_code == 0, res.output
    assert "prepare dev-clean (3 workers): 100%" in res.output
    assert_same_folder(tmp_path / "p", one_process)


def test_j_0_labels_in_this_process(corpus, one_process, tmp_path):
    res = CliRunner().invoke(main, ["prepare", *map(str, prepare_args(corpus, tmp_path / "p")), "-j", "0"])
    assert res.exit_code == 0, res.output
    assert "prepare dev-clean: 100%" in res.output
    assert_same_folder(tmp_path / "p", one_process)


def test_a_killed_rank_leaves_a_folder_the_next_run_resumes(corpus, one_process, tmp_path):
    out = tmp_path / "p"
    job = [str(ROOT / "tests" / "prepare_job.py"), corpus, out, 3]  # rank 1 dies labelling its 4th utterance
    res = subprocess.run(torchrun(2, *job, port=free_port()), env=ENV, capture_output=True, text=True)
    assert res.returncode != 0 and "SIGKILL" in res.stderr, res.stderr[-3000:]
    cached = {p.name: p.stat().st_mtime_ns for p in (out / "utts").glob("*.utt")}
    assert 3 <= len(cached) < 16
    assert sorted(p.name for p in out.iterdir() if p.name != "utts") == [LOCK]  # unfinished, nothing else written
    with pytest.raises(PreparedCorpusError, match="unfinished prepared corpus"):
        PreparedCorpus(out)

    res = subprocess.run(
        torchrun(2, "-m", "neurostat", "prepare", *prepare_args(corpus, out), port=free_port()),
        env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert {name: (out / "utts" / name).stat().st_mtime_ns for name in cached} == cached  # reused, not redone
    assert_same_folder(out, one_process)


def test_a_run_stopped_while_writing_the_folder_leaves_it_unfinished(corpus, one_process, tmp_path, monkeypatch):
    """A second prepare (other bins) stopped mid-write: no meta.json beside half-written files; the next run
    finishes it, keeping the label sets the first one had."""
    out = tmp_path / "p"
    prepare(*sources(corpus), out, PrepareSettings(default_geometry()), progress=False)
    halves = {r["id"]: np.array([i % 2]) for i, r in enumerate(PreparedCorpus(out).records)}
    attach_label_set(PreparedCorpus(out), "half", halves, "utterance", "test")

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(FrameLabels, "write", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare(*sources(corpus), out, PrepareSettings(default_geometry(), quantiles=(0.5,)), progress=False)
    assert not (out / "meta.json").exists() and (out / PREVIOUS_META).is_file() and (out / LOCK).read_text() == ""
    with pytest.raises(PreparedCorpusError, match="unfinished"):
        PreparedCorpus(out)
    monkeypatch.undo()
    meta = prepare(*sources(corpus), out, PrepareSettings(default_geometry()), progress=False)
    assert "half" in meta.label_sets and not (out / PREVIOUS_META).exists()
    got, want = folder_bytes(out), folder_bytes(one_process)
    assert [name for name in want if name != "meta.json" and got[name] != want[name]] == []
    assert meta.replace(label_sets={}) == PreparedCorpus(one_process).meta
