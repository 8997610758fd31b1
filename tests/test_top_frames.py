"""The top frames: each neuron's N largest activations with their utterance and frame, against a brute-force
reference (every activation kept and sorted), across batches, shards merged and the tie rule."""

import numpy as np
import pytest
import soundfile as sf
import torch
import xarray as xr
from transformers import AutoFeatureExtractor, AutoModel

from neurostat.engine.accumulate import Accumulator
from neurostat.engine.batching import TokenBatch
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.merge import merge_stores
from neurostat.engine.statistics import keep_top
from neurostat.model.inputs import normalize_waveform
from neurostat.model.loading import load_adapter
from neurostat.stats import open_stats
from neurostat.store import StoreError

N = 5


@torch.no_grad()
def brute_force(prepared, model_dir, n):
    """Per layer and neuron, the n largest activations of every non-ignored frame ('all' tokens) of a
    float64 batch-1 forward, largest first, equal values by (utterance index, frame)."""
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float64).eval()
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    seen = {}
    for i, layer in enumerate(model.encoder.layers):
        layer.feed_forward.intermediate_act_fn.register_forward_hook(lambda m, x, out, i=i: seen.__setitem__(i, out))
    rows = {i: [] for i in range(len(model.encoder.layers))}
    for u, utt in enumerate(prepared):
        wave, _ = sf.read(utt.audio_path, dtype="float32")
        model(torch.from_numpy(normalize_waveform(fe, wave)).double()[None])
        frames = [t for t, p in enumerate(utt.phone_frames()) if p >= 0]
        for i, a in seen.items():
            rows[i] += [(a[0, t].numpy(), u, t) for t in frames]
    out = {}
    for i, items in rows.items():
        values = np.stack([v for v, _, _ in items])  # [tokens, D]
        keys = np.array([(u << 32) | t for _, u, t in items])
        order = np.lexsort((np.broadcast_to(keys[:, None], values.shape), -values), axis=0)[:n]
        out[i] = (np.take_along_axis(values, order, 0), keys[order] >> 32, keys[order] & 0xFFFFFFFF)
    return out


def config(**kw):
    return CollectConfig(stats=("topk", "top_frames"), topk_ratio=0.1, tokens="all", top_frames=N, **kw)


def test_top_frames_equal_a_brute_force_reference_over_several_batches(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    attrs = collect(prepared, adapter, tmp_path / "s.zarr", config(batch_seconds=4.0), progress=False)
    assert attrs.statistics["top_frames"] == N
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert ds["top_value"].dims == ("layer", "top", "neuron") and ds.sizes["top"] == N
    assert list(ds["utterance"].values) == [r["id"] for r in prepared.records]
    ref = brute_force(prepared, tiny_model, N)
    for i, (values, utterance, frame) in ref.items():
        np.testing.assert_array_equal(ds["top_utterance"].values[i], utterance)
        np.testing.assert_array_equal(ds["top_frame"].values[i], frame)
        np.testing.assert_allclose(ds["top_value"].values[i], values, rtol=1e-12)
    stats = open_stats(tmp_path / "s.zarr")
    top = stats.top_frames(2, 7)
    assert [t["value"] for t in top] == sorted((t["value"] for t in top), reverse=True) and len(top) == N
    assert top[0]["utterance"] == prepared.records[ref[1][1][0, 7]]["id"] and top[0]["frame"] == ref[1][2][0, 7]
    assert top[0]["seconds"] == pytest.approx((320 * top[0]["frame"] + 200) / 16000)
    with pytest.raises(ValueError, match="layers"):
        stats.top_frames(9, 0)


def test_shards_merged_equal_one_run_and_a_store_without_them_says_so(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    collect(prepared, adapter, tmp_path / "whole.zarr", config(batch_seconds=4.0), progress=False)
    for i in range(2):
        collect(prepared, adapter, tmp_path / f"s{i}.zarr", config(batch_seconds=7.0, shard=(i, 2)), progress=False)
    merge_stores([tmp_path / "s0.zarr", tmp_path / "s1.zarr"], tmp_path / "merged.zarr")
    a, b = (xr.open_zarr(tmp_path / f"{n}.zarr", consolidated=False) for n in ("whole", "merged"))
    for name in ("top_utterance", "top_frame"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    np.testing.assert_allclose(a["top_value"].values, b["top_value"].values, rtol=1e-12)
    collect(prepared, adapter, tmp_path / "plain.zarr", CollectConfig(topk_ratio=0.1), progress=False)
    with pytest.raises(StoreError, match="top_value"):
        open_stats(tmp_path / "plain.zarr").top_frames(1, 0)


def test_equal_values_keep_the_lower_frame_id_whatever_the_batching():
    """Ties (ReLU zeros, repeated values) go to the lower frame id, so any split into batches agrees."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (40, 9), generator=g).double()  # many equal values
    ids = torch.randperm(40, generator=g) * 7
    flat = np.zeros(40, dtype=np.int64)
    results = []
    for split in ([40], [13, 27], [1, 5, 34]):
        acc = Accumulator(1, 1, 9, 1, ("top_frames",), top_frames=6)
        start = 0
        for size in split:
            part = slice(start, start + size)
            acc.update(0, x[part], TokenBatch.from_labels(flat[part], ids[part].numpy()))
            start += size
        results.append(acc.compute())
    order = np.lexsort((np.broadcast_to(ids.numpy()[:, None], (40, 9)), -x.numpy()), axis=0)[:6]
    for got in results:
        np.testing.assert_array_equal(got["top_frame"][0], ids.numpy()[order])
        np.testing.assert_array_equal(got["top_value"][0], np.take_along_axis(x.numpy(), order, 0))
    values, kept = keep_top(torch.tensor([[1.0], [2.0], [2.0]]), torch.tensor([[5], [9], [3]]), 2)
    assert values.flatten().tolist() == [2.0, 2.0] and kept.flatten().tolist() == [3, 9]


def test_checkpoints_with_the_old_name_of_the_packed_ids_still_load():
    """The packed frame ids were the state ``top_frame`` (flat, then namespaced); they are ``top_id`` now."""
    g = torch.Generator().manual_seed(1)
    acc = Accumulator(1, 1, 5, 1, ("top_frames",), top_frames=3)
    acc.update(0, torch.randn(7, 5, generator=g).double(), TokenBatch.from_labels(np.zeros(7, np.int64), np.arange(7)))
    state = acc.state_dict()
    assert "top_frames.top_id" in state
    for old in ("top_frames.top_frame", "top_frame"):
        renamed = {(old if k == "top_frames.top_id" else k): v for k, v in state.items()}
        loaded = Accumulator.from_state(renamed, 1, ("top_frames",)).compute()
        for name, value in acc.compute().items():
            np.testing.assert_array_equal(loaded[name], value)


def test_cli_top_frames_option_turns_the_statistic_on(prepared, tiny_model, tmp_path):
    from click.testing import CliRunner

    from neurostat.cli import main

    common = ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model), "-j", "0"]
    for extra, n in ((["--top-frames", "3"], 3), (["--top-frames"], 16)):
        out = tmp_path / f"s{n}.zarr"
        res = CliRunner().invoke(main, [*common, *extra, "--out", str(out)])
        assert res.exit_code == 0, res.output
        stats = open_stats(out)
        assert "top_frames" in stats.meta.stats and stats.ds.sizes["top"] == n
    res = CliRunner().invoke(main, [*common, "--top-frames", "0", "--out", str(tmp_path / "bad.zarr")])
    assert res.exit_code != 0 and "--top-frames must be at least 1" in res.output
