"""Scale-out: duration-balanced shares, a 2-process gloo job equal to one process, SIGKILL of one rank and
``--resume``, and a resume with another world size refused."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import xarray as xr
from test_collect import assert_equals_uninterrupted
from test_labelsets import attach_both

from neurostat.corpus.prepared import PreparedCorpus
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.distributed import balanced_shares
from neurostat.engine.merge import merge_stores
from neurostat.model.loading import load_adapter
from neurostat.stats import open_stats

RATIO = 0.1
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1"}


@pytest.mark.parametrize("size", range(1, 8))
def test_shares_cover_every_utterance_once_balanced_within_one_duration(size):
    rng = random.Random(size)
    for trial in range(40):
        n = rng.randrange(0, 30)
        durations = [rng.choice([rng.uniform(0.5, 30.0), 5.0]) for _ in range(n)]  # some equal durations
        shares = balanced_shares(durations, size)
        assert len(shares) == size and shares == balanced_shares(list(durations), size)
        assert sorted(i for share in shares for i in share) == list(range(n))
        loads = [sum(durations[i] for i in share) for share in shares]
        assert max(loads) - min(loads) <= max(durations, default=0.0) + 1e-9


def torchrun(nproc: int, *args, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port),
        *map(str, args),
    ]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_store(got, want, rtol=1e-12):
    """Counts exactly; means and maxima to ``rtol`` of the neuron's scale (its largest |mean| + std over the
    labels), variances to its square: the two runs batch the utterances differently, so
    an activation differs by float64 rounding of that scale, whatever its own size."""
    a, b = xr.open_zarr(got, consolidated=False), xr.open_zarr(want, consolidated=False)
    assert set(a.data_vars) == set(b.data_vars)
    scale = np.nanmax(np.abs(b["mean"].values) + np.sqrt(b["var"].values), axis=1, keepdims=True)  # [layer, 1, neuron]
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if x.dtype.kind == "i":
            np.testing.assert_array_equal(x, y, err_msg=name)
        else:
            assert np.array_equal(np.isnan(x), np.isnan(y)), name
            size = np.broadcast_to(scale**2 if name == "var" else scale, x.shape)
            seen = ~np.isnan(y)
            assert (np.abs(x[seen] - y[seen]) <= rtol * size[seen]).all(), name


def test_two_gloo_processes_equal_one_in_float64_with_label_sets(prepared, tiny_model, tmp_path):
    shutil.copytree(prepared.path, tmp_path / "prepared")
    corpus = PreparedCorpus(tmp_path / "prepared")
    attach_both(corpus, tmp_path)
    settings = {
        "stats": ["topk", "positive", "moments", "max_abs", "top_frames"],
        "topk_ratio": RATIO,
        "batch_seconds": 4.0,
        "labels": ["phone", "gender", "spk"],
    }
    job = {
        "model": str(tiny_model),
        "prepared": str(corpus.path),
        "out": str(tmp_path / "job.zarr"),
        "config": settings,
    }
    res = subprocess.run(
        torchrun(2, "tests/distributed_job.py", json.dumps(job), port=free_port()),
        env=ENV,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    config = CollectConfig(
        stats=tuple(settings["stats"]), topk_ratio=RATIO, batch_seconds=4.0, labels=tuple(settings["labels"])
    )
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    collect(corpus, adapter, tmp_path / "one.zarr", config, progress=False)
    assert_same_store(tmp_path / "job.zarr", tmp_path / "one.zarr")
    meta = open_stats(tmp_path / "job.zarr").meta
    ranks = meta.distributed["ranks"]
    assert meta.distributed["world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    assert sum(r["utterances"] for r in ranks) == len(corpus) == meta.progress.utterances_done
    assert all(r["elapsed_seconds"] > 0 for r in ranks)
    partials = sorted((tmp_path / "job.zarr.ranks").iterdir())
    assert [p.name for p in partials] == ["rank-000-of-002.zarr", "rank-001-of-002.zarr"]
    merge_stores(partials, tmp_path / "merged.zarr")
    assert_same_store(tmp_path / "merged.zarr", tmp_path / "one.zarr")


def test_sigkill_of_one_rank_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_model, longer_prepared):
    out = tmp_path / "job.zarr"
    common = ["-m", "neurostat", "collect", "--prepared", longer_prepared.path, "--model", tiny_model, "--out", out]
    common += ["--topk-ratio", RATIO, "--batch-seconds", 0.001, "-j", 0]
    proc = subprocess.Popen(
        torchrun(2, *common, "--checkpoint-utterances", 1, port=free_port()),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ranks = [out.with_name("job.zarr.ranks") / f"rank-00{r}-of-002.zarr" / "neurostat" for r in (0, 1)]

    def done(rank: int) -> int:
        pointer = ranks[rank] / "checkpoint.json"
        return json.loads(pointer.read_text())["progress"]["utterances_done"] if pointer.is_file() else 0

    deadline = time.time() + 120
    while time.time() < deadline and done(1) < 3:
        time.sleep(0.002)
    pid = int((ranks[1] / "writer.lock").read_text().split()[1])
    os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "SIGKILL" in err  # torchrun's report names rank 1
    if done(0):  # rank 0 was in its loop (not still starting): it stopped after its batch, with a checkpoint
        assert "rank 0 of 2: stopped by SIGTERM" in err and "collect (2 ranks)" in err, err[-3000:]  # its bar: the job
    assert 3 <= done(1) < 20, "rank 1 was not interrupted mid-way"
    assert not (out / "zarr.json").is_file()

    res = subprocess.run(torchrun(3, *common, "--resume", port=free_port()), env=ENV, capture_output=True, text=True)
    assert res.returncode != 0 and "a run with 2 processes" in res.stderr and "this run has 3" in res.stderr

    res = subprocess.run(torchrun(2, *common, "--resume", port=free_port()), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 ranks (gloo)" in res.stdout
    assert_equals_uninterrupted(out, longer_prepared, tiny_model, tmp_path)
    assert open_stats(out).meta.progress.utterances_done == 40
