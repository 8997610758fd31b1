"""Shared fixtures.  The environment must be set before any Triton kernel module is imported."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# collect picks torch's threads by the cores free when a run starts (neurostat.engine.device.forward_threads);
# a fixed count keeps two runs of one test the same arithmetic however busy the machine is
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (4 speakers x 3 utterances), built once per test session."""
    from neurostat.corpus.synth import synthesize

    out = tmp_path_factory.mktemp("demo")
    synthesize(out, "dev-clean", num_speakers=4, utterances_per_speaker=3, seed=1, progress=False)
    return out


@pytest.fixture
def corpus_copy(demo_corpus, tmp_path) -> Path:
    """A private copy of the demo corpus that a test may damage."""
    dst = tmp_path / "corpus"
    shutil.copytree(demo_corpus, dst)
    return dst


@pytest.fixture(scope="session")
def prepared(demo_corpus, tmp_path_factory):
    """The demo corpus prepared with the default geometry."""
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.prepared import PreparedCorpus
    from neurostat.frames import default_geometry

    out = tmp_path_factory.mktemp("prepared")
    prepare(
        demo_corpus / "LibriSpeech",
        "dev-clean",
        demo_corpus / "alignments",
        out,
        PrepareSettings(default_geometry()),
        progress=False,
    )
    return PreparedCorpus(out)


@pytest.fixture(scope="session")
def longer_prepared(tmp_path_factory):
    """A prepared corpus of 40 utterances (4 speakers x 10), long enough to kill a run mid-way."""
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.prepared import PreparedCorpus
    from neurostat.corpus.synth import synthesize
    from neurostat.frames import default_geometry

    root = tmp_path_factory.mktemp("longer")
    synthesize(root / "c", num_speakers=4, utterances_per_speaker=10, seed=3, progress=False)
    prepare(
        root / "c" / "LibriSpeech", "dev-clean", root / "c" / "alignments", root / "p",
        PrepareSettings(default_geometry()), progress=False,
    )  # fmt: skip
    return PreparedCorpus(root / "p")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from neurostat.model.factory import save_model

    return save_model(tmp_path_factory.mktemp("tiny-hubert"))
