"""The run's typed records: store metadata, progress and the run spec."""

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from neurostat.corpus.prepared import PreparedCorpusError, PreparedMeta
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.spec import RunSpec
from neurostat.engine.statistics import TABLE
from neurostat.model.loading import load_adapter
from neurostat.store import Progress, StoreError, StoreMeta

# root attrs of a collected and a merged store and a prepared corpus's meta.json, written by neurostat
# before these records existed
RECORDS = json.loads((Path(__file__).parent / "data" / "records-before.json").read_text())
BEFORE = RECORDS["store"]


@pytest.mark.parametrize("kind", sorted(BEFORE))
def test_stores_written_before_the_records_read_back_unchanged(kind):
    attrs = BEFORE[kind]
    meta = StoreMeta.from_attrs(attrs)
    assert meta.to_attrs() == attrs
    assert meta.progress.utterances_done == attrs["progress"]["utterances_done"] and meta.k == attrs["statistics"]["k"]


def test_a_store_missing_a_section_is_a_clear_error():
    attrs = {k: v for k, v in BEFORE["collect"].items() if k != "batching"}
    with pytest.raises(StoreError, match="lack batching"):
        StoreMeta.from_attrs(attrs)


def test_progress_adds_up_and_keeps_unset_fields_out_of_the_record():
    a = Progress(utterances_done=2, frames=10, tokens=4, audio_seconds=1.5, skips={"x": 1}, utterances_total=3)
    b = Progress(utterances_done=1, frames=5, tokens=2, audio_seconds=0.5, skips={"x": 1, "y": 2}, loop_seconds=9.0)
    total = Progress.total([a, b])
    assert (total.utterances_done, total.frames, total.tokens, total.audio_seconds) == (3, 15, 6, 2.0)
    assert total.skips == {"x": 2, "y": 2} and total.utterances_total == 3 and total.counted == -1
    assert "loop_seconds" not in total.to_dict() and "complete" not in total.to_dict()
    assert Progress.from_dict(b.to_dict()) == b and a.skips == {"x": 1}  # the parts stay as they were


def test_collect_leaves_the_callers_config_as_it_was(prepared, tiny_model, tmp_path):
    """Defaults are resolved into the run spec, never written back: a config reused elsewhere stays neutral."""
    config = CollectConfig(topk_ratio=0.1, shard=(0, 4))
    before = asdict(config)
    meta = collect(prepared, load_adapter(str(tiny_model)), tmp_path / "s.zarr", config, progress=False)
    assert asdict(config) == before and config.batch_seconds is None and config.backend == "auto"
    assert meta.batching["batch_seconds"] > 0 and meta.statistics["backend"] == "torch"
    assert StoreMeta.read(tmp_path / "s.zarr") == meta


def test_the_memory_guard_counts_the_top_frames_by_their_rows(prepared, tiny_model):
    adapter = load_adapter(str(tiny_model))
    spec = RunSpec.resolve(CollectConfig(stats=tuple(TABLE), top_frames=3), adapter, prepared)
    labels = spec.space.size
    assert spec.bytes_per_neuron(TABLE["top_frames"]) == 3 * (8 + 8)
    assert spec.bytes_per_neuron(TABLE["moments"]) == labels * 2 * 8
    assert spec.bytes_per_neuron(TABLE["topk"]) == labels * 8


def test_prepared_meta_written_before_reads_back_unchanged(tmp_path):
    """meta.json's fields are those of format 2 (format 3 moved the frame labels into one array, see
    test_prepare): a format-2 folder is refused with the command that writes it again."""
    with pytest.raises(PreparedCorpusError, match="format 2 is not 3 .* neurostat prepare --root /tmp/ba/work/c/Libri"):
        PreparedMeta.from_dict(RECORDS["prepared"], tmp_path)
    meta = {**RECORDS["prepared"], "format": 3}
    assert "align" not in meta["pitch"]  # written before --pitch-align: F0 was read by time
    assert PreparedMeta.from_dict(meta, tmp_path).to_dict() == {**meta, "pitch": {**meta["pitch"], "align": "time"}}
    paper = {**meta, "alignments": None, "paper_labels": "/official/info", "phone_map": "official phone table"}
    paper["pitch"] = {k: v for k, v in meta["pitch"].items() if k != "step_seconds"} | {
        "rule": "paper",
        "align": "paper",
    }
    assert PreparedMeta.from_dict(paper, tmp_path).to_dict() == paper  # the paper-label import's shape
    with pytest.raises(PreparedCorpusError, match="format 1 is not"):
        PreparedMeta.from_dict({**meta, "format": 1}, tmp_path)
    with pytest.raises(PreparedCorpusError, match="incomplete"):
        PreparedMeta.from_dict({k: v for k, v in meta.items() if k != "geometry"}, tmp_path)


TINY_WEIGHTS_BEFORE = "8281d070c2923c12fb4c9d7e961af8063729c699"
"""The digest of the tiny model's weights when the fixture was written (transformers' random init
depends on its release: CI's run on the oldest releases builds other weights)."""


def weights_digest(model_dir: Path) -> str:
    """SHA-1 over a checkpoint's tensors (names and float32 values, in name order)."""
    import hashlib

    from safetensors.torch import load_file

    tensors, digest = load_file(str(Path(model_dir) / "model.safetensors")), hashlib.sha1()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].float().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.fp32
def test_a_store_written_now_has_the_arrays_written_before_the_records(prepared, tiny_model, tmp_path):
    """``data/store-arrays-before.npz``: the arrays of this very run in float64, written by 71665d3 (the code
    before the typed records and the declarations).  A float64 run, so that a fixture written on one CPU
    holds on every other: counts and top frames exactly, floats within the float64 forward bound (another
    CPU's float32 GEMMs would move them by far more, and the counts with them)."""
    import numpy as np
    import torch
    import xarray as xr
    from rounding import assert_within, forward_delta, forward_path, layer_scale, moment_tolerances, unit_roundoff

    if weights_digest(tiny_model) != TINY_WEIGHTS_BEFORE:
        pytest.skip(
            "this transformers initialises the tiny model's weights otherwise than the one that wrote the fixture"
        )
    before = np.load(Path(__file__).parent / "data" / "store-arrays-before.npz")
    config = CollectConfig(
        stats=("topk", "positive", "moments", "max_abs", "top_frames"), top_frames=4, batch_seconds=3.0
    )
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    collect(prepared, adapter, tmp_path / "s.zarr", config, progress=False)
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert sorted(ds.data_vars) == sorted(before.files)
    longest, u = max(len(utt.phone_frames()) for utt in prepared), unit_roundoff(torch.float64)
    scale = layer_scale(before["max_abs"])
    delta = forward_delta(forward_path(adapter.config, longest)[:-1], scale, u)
    tolerance = moment_tolerances(delta, scale, before["frames"].max(), before["frames"], u)
    for name in before.files:
        now, then = ds[name].values, before[name]
        assert now.dtype == then.dtype and now.shape == then.shape, name
        if then.dtype.kind == "f":
            assert_within(now, then, tolerance[name], name)
        else:
            np.testing.assert_array_equal(now, then, err_msg=name)
