"""The whole engine on a GPU (skipped without one; `bench/device_run.sh` runs it on a lent card): the
batches uploaded a batch ahead on a copy stream, the statistics on a side stream, the GPU's default
front end and loader workers — exact in float64 against the hook reference, and the defaults (bf16,
triton) count every token."""

import numpy as np
import pytest
import torch
import xarray as xr
from test_collect import RATIO, assert_store_equals, hook_reference

from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.device import model_dtype
from neurostat.model.loading import load_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_float64_run_on_the_gpu_equals_the_hook_reference(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model), device="cuda", dtype=torch.float64)
    config = CollectConfig(topk_ratio=RATIO, tokens="all", backend="torch", batch_seconds=12.0)
    collect(prepared, adapter, tmp_path / "s.zarr", config, progress=False)
    assert_store_equals(tmp_path / "s.zarr", hook_reference(prepared, tiny_model, "all", torch.float64, [0, 1, 2]))


def test_the_gpu_defaults_count_every_token(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model), device="cuda", dtype=model_dtype("auto", "cuda"))
    meta = collect(
        prepared, adapter, tmp_path / "s.zarr", CollectConfig(topk_ratio=RATIO, tokens="all"), progress=False
    )
    ref = hook_reference(prepared, tiny_model, "all", torch.float64, [0])
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    np.testing.assert_array_equal(ds["frames"].values, ref["frames"])
    assert (ds["topk_count"].values.sum((1, 2)) == ref["frames"].sum() * meta.k).all()
    assert meta.statistics["backend"] == "triton" and meta.batching["loader_workers"] >= 1
