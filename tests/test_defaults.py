"""The defaults collect picks where it runs: loading workers, torch threads beside them, the model dtype."""

import torch
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.engine import device as device_module
from neurostat.engine.device import default_num_jobs, forward_threads, model_dtype
from neurostat.model.wav2vec2 import WaveformAdapter
from neurostat.stats import open_stats


def test_loading_workers_and_threads_follow_the_device_and_the_cores(monkeypatch):
    for cores, cpu_jobs, gpu_jobs in ((1, 0, 1), (2, 0, 1), (4, 0, 2), (6, 1, 4), (16, 1, 12), (64, 1, 12)):
        monkeypatch.setattr(device_module, "usable_cores", lambda: cores)
        assert (default_num_jobs("cpu"), default_num_jobs("cuda")) == (cpu_jobs, gpu_jobs), cores
        assert forward_threads("cpu", cpu_jobs) == (None if cpu_jobs == 0 else cores - cpu_jobs)
        assert forward_threads("cuda", gpu_jobs) is None
    assert forward_threads("cpu", 3) == 61  # an explicit -j leaves torch the other cores


def test_the_model_dtype_is_fast_on_the_device(monkeypatch):
    assert model_dtype("auto", "cpu") == torch.float32
    for major, dtype in ((7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
        assert model_dtype("auto", "cuda") == dtype
    assert model_dtype("float64") == torch.float64


def test_collect_with_the_clis_defaults_records_and_says_them(prepared, tiny_model, tmp_path, monkeypatch):
    """With 8 cores a CPU run gets one worker and 7 torch threads during the loop, restored after it."""
    monkeypatch.setattr(device_module, "usable_cores", lambda: 8)
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
