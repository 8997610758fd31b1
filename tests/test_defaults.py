"""The defaults collect picks where it runs: loading workers, torch threads beside them, the model dtype."""

import torch
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.engine import device as device_module
from neurostat.engine.device import default_num_jobs, forward_threads, model_dtype
from neurostat.model.wav2vec2 import WaveformAdapter
from neurostat.stats import open_stats


def test_loading_workers_and_threads_follow_the_device_and_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, cpu_jobs, gpu_jobs in ((1, 0, 1), (2, 0, 1), (4, 0, 2), (6, 1, 4), (16, 1, 12), (64, 1, 12)):
        monkeypatch.setattr(device_module, "usable_cores", lambda: cores)
        monkeypatch.setattr(device_module, "idle_cores", lambda: float(cores))  # a quiet machine
        assert (default_num_jobs("cpu"), default_num_jobs("cuda")) == (cpu_jobs, gpu_jobs), cores
        assert forward_threads("cpu", cpu_jobs) == cores - cpu_jobs
        assert forward_threads("cuda", gpu_jobs) is None
    assert forward_threads("cpu", 3) == 61  # an explicit -j leaves torch the other cores


def test_threads_leave_the_cores_other_jobs_keep_busy(monkeypatch):
    """A thread whose core another job holds stalls every parallel region (issue 42, item 4): torch gets the
    cores that were idle as the run started, at least one; OMP_NUM_THREADS set by the user is kept."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_module, "usable_cores", lambda: 8)
    for idle, threads in ((8.0, 8), (5.4, 5), (0.3, 1), (None, 8)):
        monkeypatch.setattr(device_module, "idle_cores", lambda idle=idle: idle)
        assert forward_threads("cpu", 0) == threads, idle
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert forward_threads("cpu", 0) is None
    assert 0 <= device_module.idle_cores(0.05) <= len(open("/proc/stat").read().split("\ncpu")) - 1


def test_torch_spins_briefly_before_it_waits_for_its_threads():
    """GNU OpenMP's default spin count made a CPU collect 4x slower beside a job that took a core of its
    threads: neurostat shortens it before torch loads its runtime (a fresh interpreter that imports neurostat
    first), and leaves a wait policy or spin count of the user's alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = "import neurostat, os, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    cases = (({}, "10000 None"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"), ({"GOMP_SPINCOUNT": "5"}, "5 None"))
    for mine, expected in cases:
        run = subprocess.run([sys.executable, "-c", code], env=env | mine, capture_output=True, text=True)
        assert run.stdout == expected + "\n", (mine, run.stdout, run.stderr)


def test_the_model_dtype_is_fast_on_the_device(monkeypatch):
    assert model_dtype("auto", "cpu") == torch.float32
    for major, dtype in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        assert model_dtype("auto", "cuda") == dtype
    assert model_dtype("float64") == torch.float64


def test_collect_with_the_clis_defaults_records_and_says_them(prepared, tiny_model, tmp_path, monkeypatch):
    """With 8 idle cores a CPU run gets one worker and 7 torch threads during the loop, restored after it."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(device_module, "usable_cores", lambda: 8)
    monkeypatch.setattr(device_module, "idle_cores", lambda: 8.0)
    seen, before = [], torch.get_num_threads()
    encode = WaveformAdapter.encode

    def spying(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(WaveformAdapter, "encode", spying)
    out = tmp_path / "s.zarr"
    res = CliRunner().invoke(
        main, ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert seen and set(seen) == {7} and torch.get_num_threads() == before
    meta = open_stats(out).meta
    assert meta.fingerprint["dtype"] == "float32" and meta.batching["loader_workers"] == 1
    assert "float32 model" in res.output and "1 loading worker," in res.output.replace("\n", ",")
