"""The family table and what a store records of the model that wrote it (issue 39): the records come from the
loaded model and the run's settings, never assumed."""

import torch
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.spec import RunSpec
from neurostat.model.factory import save_model
from neurostat.model.loading import load_adapter
from neurostat.store import StoreMeta


def test_a_store_records_what_its_model_does(prepared, tiny_model, tmp_path):
    """Group norm or not from the front end's modules, the frame mask and front end the run used, and a float64
    run's moments and precision in float64; `info` prints them."""
    base = RunSpec.resolve(CollectConfig(), load_adapter(str(tiny_model)), prepared).store_meta(prepared)
    assert base.batching["group_norm"] == "statistics per utterance over its valid positions"
    assert base.batching["frame_mask"].startswith("boolean frame mask to the encoder")
    assert base.batching["front_end"] == "gemm" and base.batching["dtype"] == "float32"
    assert base.statistics["moments"].startswith("per-batch fp32 sums")
    stable = load_adapter(str(save_model(tmp_path / "ln", stable_layer_norm=True)), dtype=torch.float64)
    config = CollectConfig(front_end="per-utterance", stats=("topk", "moments"))
    meta = RunSpec.resolve(config, stable, prepared).store_meta(prepared)
    assert meta.batching["group_norm"] == "none (a layer-norm front end normalises each frame)"
    assert meta.batching["front_end"] == "per-utterance" and meta.batching["dtype"] == "float64"
    assert meta.statistics["moments"].startswith("per-batch float64 sums")
    assert meta.statistics["precision"].startswith("fp32: the model's own float64 activations")
    out = tmp_path / "s.zarr"
    collect(prepared, stable, out, config, progress=False)
    assert StoreMeta.read(out).batching == meta.batching
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "forward: per-utterance front end on cpu; group norm: none (a layer-norm front end" in res.output
    assert "precision: float64 model; statistics fp32: the model's own float64 activations" in res.output
    assert "moments: per-batch float64 sums" in res.output
