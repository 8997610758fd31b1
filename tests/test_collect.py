import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import xarray as xr
from click.testing import CliRunner
from float64_reference import count_slack, phone_mid, stats_reference
from rounding import SUM_BOUND, assert_within, forward_delta, forward_path, layer_scale, moment_tolerances, unit_roundoff
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

from neurostat.choices import FRONT_ENDS
from neurostat.cli import main
from neurostat.corpus.synth import TRAINING_VARIANTS
from neurostat.demo import demo_model
from neurostat.engine.collect import CollectConfig, collect, describe_collect
from neurostat.engine.merge import merge_stores
from neurostat.engine.spec import RunSpec
from neurostat.engine.statistics import TABLE
from neurostat.labelspace import LabelSpace
from neurostat.model.factory import model_config, save_model
from neurostat.model.families import ModelError
from neurostat.model.frontend import default_front_end
from neurostat.model.loading import load_adapter
from neurostat.phones import PHONES
from neurostat.stats import open_stats
from neurostat.store import StoreError, StoreMeta, StoreWriter

RATIO = 0.1  # k = round(0.1 * 37) = 4


def hook_reference(prepared, model_dir, mode, dtype, layers):
    """Float64 statistics from the model's own batch-1 forward, activations captured by forward hooks."""
    model = AutoModel.from_pretrained(model_dir, dtype=dtype).eval()
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    captured = {}
    for i, layer in enumerate(model.encoder.layers):
        layer.feed_forward.intermediate_act_fn.register_forward_hook(
            lambda m, inp, out, i=i: captured.__setitem__(i, out)
        )
    rows, longest = {layer: [] for layer in layers}, 0
    for utt in prepared:
        wave, sr = sf.read(utt.audio_path, dtype="float32")
        assert sr == fe.sampling_rate
        x = torch.from_numpy(fe(wave, sampling_rate=sr, return_tensors="np").input_values[0]).to(dtype)
        with torch.no_grad():
            model(x[None])
        phones, joint = utt.phone_frames(), LabelSpace.of_corpus(prepared).joint_frames(utt)
        if mode == "phone-mid":
            frames = phone_mid(phones)
        else:
            frames = [t for t, p in enumerate(phones) if p >= 0 and (mode == "all" or PHONES[p] not in ("sil", "spn"))]
        for layer in layers:
            a = captured[layer][0].double().numpy()
            rows[layer].extend((a[t], int(joint[t])) for t in frames)
        longest = max(longest, captured[0].shape[1])
    width, size = model.config.intermediate_size, LabelSpace.of_corpus(prepared).size
    k = max(1, round(RATIO * width))
    ref = stats_reference(rows, size, width, k)
    if dtype == torch.float32:  # another fp32 forward may differ by the forward bound: how far, and what it moves
        path, scale, u = forward_path(model.config, longest), layer_scale(ref["max_abs"]), unit_roundoff(dtype)
        delta = forward_delta([path[layer] for layer in layers], scale, u)
        ref["tolerance"] = moment_tolerances(delta, scale, ref["frames"].max(), ref["frames"], u)
        delta = {layer: ref["tolerance"]["max_abs"][i].item() for i, layer in enumerate(layers)}
        ref["slack"] = count_slack(rows, size, width, k, delta)
    return ref


def assert_store_equals(path, ref, rtol=1e-9, atol=1e-12):
    """A store against :func:`hook_reference`: float64 references to ``rtol``/``atol``; fp32 ones within
    the forward bound (counts within the tokens where a neuron's membership is that close to changing)."""
    ds = xr.open_zarr(path, consolidated=False)
    np.testing.assert_array_equal(ds["frames"].values, ref["frames"])
    for name in ("topk_count", "positive_count"):
        if "slack" in ref:
            assert (np.abs(ds[name].values - ref[name]) <= ref["slack"][name]).all(), name
        else:
            np.testing.assert_array_equal(ds[name].values, ref[name], err_msg=name)
    for name in ("mean", "var", "max_abs", "abs_sum"):
        if name in ds and "tolerance" in ref:
            assert_within(ds[name].values, ref[name], ref["tolerance"][name], name)
        elif name in ds:
            np.testing.assert_allclose(ds[name].values, ref[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("mode", ["phone-mid", "all", "no-silence"])
def test_float64_statistics_match_hook_reference(prepared, tiny_model, tmp_path, mode):
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    config = CollectConfig(stats=tuple(TABLE), topk_ratio=RATIO, tokens=mode, batch_seconds=10.0, front_end="batched")
    attrs = collect(prepared, adapter, tmp_path / "s.zarr", config, progress=False)
    assert {"max_abs", "abs_sum"} <= set(xr.open_zarr(tmp_path / "s.zarr", consolidated=False))
    assert attrs.complete and attrs.progress.utterances_done == len(prepared)
    ref = hook_reference(prepared, tiny_model, mode, torch.float64, [0, 1, 2])
    assert_store_equals(tmp_path / "s.zarr", ref)
    assert attrs.progress.tokens == ref["frames"].sum()


@pytest.mark.fp32
def test_float32_batch_of_one_matches_hook_reference_and_layers_subset(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model))
    config = CollectConfig(topk_ratio=RATIO, tokens="phone-mid", batch_seconds=1e-3, layers=[1, 3])
    collect(prepared, adapter, tmp_path / "s.zarr", config, progress=False)
    ref = hook_reference(prepared, tiny_model, "phone-mid", torch.float32, [0, 2])
    assert_store_equals(tmp_path / "s.zarr", ref)  # within the fp32 bounds (the float64 test above: to 1e-9)
    assert ref["slack"]["topk_count"].sum() < 0.01 * ref["topk_count"].sum()  # a bound that still tests
    assert xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["layer"].values.tolist() == [1, 3]


@pytest.mark.fp32
def test_padded_float32_batches_count_the_same_tokens(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model))
    collect(
        prepared,
        adapter,
        tmp_path / "s.zarr",
        CollectConfig(topk_ratio=RATIO, tokens="all", batch_seconds=30.0, front_end="batched"),
        progress=False,
    )
    ref = hook_reference(prepared, tiny_model, "all", torch.float32, [0, 1, 2])
    assert_store_equals(tmp_path / "s.zarr", ref)


@pytest.mark.fp32
def test_store_layout_api_and_info(prepared, tiny_model, tmp_path):
    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=RATIO), progress=False)
    ds = xr.open_zarr(out, consolidated=False)
    assert dict(ds.sizes) == {"layer": 3, "label": LabelSpace.of_corpus(prepared).size, "neuron": 37}
    assert ds["topk_count"].dims == ("layer", "label", "neuron") and ds["topk_count"].dtype == np.int64
    assert ds["mean"].dtype == np.float64 and ds["frames"].dims == ("label",)
    assert {"phone", "gender", "pitch_bin"} <= set(ds.coords)
    assert ds["layer"].values.tolist() == [1, 2, 3]
    assert ds.attrs["statistics"]["k"] == 4 and ds.attrs["statistics"]["tokens"] == "phone-mid"
    assert ds.attrs["pitch"]["edges"] == prepared.edges and ds.attrs["model"]["width"] == 37
    stats = open_stats(out)
    p = stats.probability("topk", by=("gender", "phone"))
    assert p.dims == ("layer", "gender", "phone", "neuron") and p.shape == (3, 2, len(PHONES), 37)
    counts = ds["topk_count"].values.reshape(3, len(PHONES), 2, 4, 37)
    frames = ds["frames"].values.reshape(len(PHONES), 2, 4)
    with np.errstate(invalid="ignore"):
        expected = counts.sum(3).transpose(0, 2, 1, 3) / frames.sum(2).T[None, :, :, None]
    np.testing.assert_allclose(p.values, expected)
    mean, var = stats.moments(by=("pitch_bin",))
    assert mean.shape == (3, 4, 37) and np.isfinite(var.values[:, :3]).all()
    with pytest.raises(StoreError, match="no 'max_abs'.*--stat"):
        stats.max_abs()
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0 and "3 layers x 37 FFN neurons" in res.output and "tokens per phone" in res.output


def test_max_abs_marginals_through_open_stats(prepared, tiny_model, tmp_path):
    out = tmp_path / "s.zarr"
    config = CollectConfig(stats=("topk", "max_abs"), topk_ratio=RATIO, tokens="all", batch_seconds=10.0)
    collect(prepared, load_adapter(str(tiny_model), dtype=torch.float64), out, config, progress=False)
    ref = hook_reference(prepared, tiny_model, "all", torch.float64, [0, 1, 2])
    stats = open_stats(out)
    assert stats.meta.statistics["merge"] == {"topk_count": "sum", "max_abs": "max"}
    shape = (3, len(PHONES), 2, 4, 37)  # layer, phone, gender, pitch bin, neuron
    joint = xr.open_zarr(out, consolidated=False)["max_abs"].values
    np.testing.assert_allclose(
        joint, ref["max_abs"], rtol=1e-10, atol=0
    )  # NaN where no tokens; 1e-10: the front ends' float64 bound
    joint = joint.reshape(shape)
    with np.errstate(invalid="ignore"):
        by_gender = np.fmax.reduce(np.fmax.reduce(joint, axis=3), axis=1)
    np.testing.assert_array_equal(stats.max_abs(by=("gender",)).values, by_gender)
    by_phone_bin = stats.max_abs(by=("phone", "pitch_bin"))
    assert by_phone_bin.dims == ("layer", "phone", "pitch_bin", "neuron")
    np.testing.assert_array_equal(by_phone_bin.values, np.fmax.reduce(joint, axis=2))
    empty = ref["frames"].reshape(shape[1:4]).sum(1) == 0  # (phone, bin) cells without tokens
    assert empty.any() and np.isnan(by_phone_bin.values[:, empty]).all()
    with pytest.raises(StoreError, match="no 'mean'"):
        stats.moments()


def test_abs_sum_marginals_through_open_stats(prepared, tiny_model, tmp_path):
    """An opt-in statistic declared with the existing ``sum`` rule: Σ|a| per label, summed into marginals."""
    out = tmp_path / "s.zarr"
    config = CollectConfig(stats=("abs_sum",), topk_ratio=RATIO, tokens="all", batch_seconds=10.0)
    collect(prepared, load_adapter(str(tiny_model), dtype=torch.float64), out, config, progress=False)
    ref = hook_reference(prepared, tiny_model, "all", torch.float64, [0, 1, 2])
    stats = open_stats(out)
    assert stats.meta.statistics["merge"] == {"abs_sum": "sum"}
    joint = xr.open_zarr(out, consolidated=False)["abs_sum"].values
    np.testing.assert_allclose(joint, ref["abs_sum"], rtol=1e-10, atol=0)  # the front ends' float64 bound
    by_gender = joint.reshape(3, len(PHONES), 2, 4, 37).sum(axis=(1, 3))
    np.testing.assert_allclose(stats.reduce("abs_sum", by=("gender",)).values, by_gender, rtol=1e-12)
    mean_abs = stats.reduce("abs_sum", by=("phone",)) / stats.tokens(by=("phone",))
    assert mean_abs.dims == ("layer", "phone", "neuron") and (mean_abs.fillna(0).values >= 0).all()


def test_merge_of_shards_equals_single_run(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model))
    cfg = dict(topk_ratio=RATIO, batch_seconds=1e-3, stats=tuple(TABLE))
    collect(prepared, adapter, tmp_path / "all.zarr", CollectConfig(**cfg), progress=False)
    for i in range(3):
        collect(prepared, adapter, tmp_path / f"s{i}.zarr", CollectConfig(shard=(i, 3), **cfg), progress=False)
    res = CliRunner().invoke(
        main, ["merge", *(str(tmp_path / f"s{i}.zarr") for i in range(3)), "--out", str(tmp_path / "m.zarr")]
    )
    assert res.exit_code == 0, res.output
    a, b = (
        xr.open_zarr(tmp_path / "all.zarr", consolidated=False),
        xr.open_zarr(tmp_path / "m.zarr", consolidated=False),
    )
    for name in ("frames", "topk_count", "positive_count", "max_abs"):
        np.testing.assert_array_equal(a[name].values, b[name].values)
    tolerance = fp32_tolerances(a, prepared)  # the same forwards; fp32 per-batch sums around each run's shift
    for name in ("mean", "var", "abs_sum"):
        assert_within(a[name].values, b[name].values, tolerance[name], name, SUM_BOUND)
    assert b.attrs["progress"]["utterances_done"] == len(prepared)
    with pytest.raises(StoreError, match="counted in both"):
        merge_stores([tmp_path / "s0.zarr", tmp_path / "all.zarr"], tmp_path / "bad.zarr")
    collect(
        prepared,
        adapter,
        tmp_path / "pos.zarr",
        CollectConfig(**{**cfg, "stats": ("positive",), "shard": (1, 3)}),
        progress=False,
    )
    with pytest.raises(StoreError, match="differs .* in stats"):
        merge_stores([tmp_path / "s0.zarr", tmp_path / "pos.zarr"], tmp_path / "bad2.zarr")


def _cli(*args):
    return [sys.executable, "-m", "neurostat", "collect", *map(str, args)]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _common(prepared_dir, model):
    """CLI options of the subprocess runs: one utterance per batch, in the main process."""
    return ["--prepared", prepared_dir, "--model", model, "--topk-ratio", RATIO, "--batch-seconds", 0.001, "-j", 0]


def _start_and_wait(common, out, min_done):
    """Starts `neurostat collect` checkpointing every utterance; returns once ``min_done`` are checkpointed."""
    proc = subprocess.Popen(
        _cli(*common, "--out", out, "--checkpoint-utterances", 1),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pointer = out / "neurostat" / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.is_file() and json.loads(pointer.read_text())["progress"]["utterances_done"] >= min_done:
            break
        time.sleep(0.002)
    return proc, pointer


def fp32_tolerances(ds, corpus, model_dir=None) -> dict:
    """Tolerances of a float32 store's moments against another run over ``corpus``: of the same forwards
    (``model_dir`` None: only the per-batch sums differ) or of other forwards of the model in ``model_dir``
    (the forward bound); the layer scale from the store's ``max_abs``."""
    scale, u, frames = layer_scale(ds["max_abs"].values), unit_roundoff(np.float32), ds["frames"].values
    delta = 0.0
    if model_dir is not None:
        path = forward_path(AutoConfig.from_pretrained(model_dir), max(len(utt.phone_frames()) for utt in corpus))
        delta = forward_delta([path[layer - 1] for layer in ds["layer"].values], scale, u)
    return moment_tolerances(delta, scale, frames.max(), frames, u)


def assert_equals_uninterrupted(out, corpus, model_dir, tmp_path, stats=CollectConfig.stats):
    """The store at ``out`` (interrupted and resumed, by processes whose GEMMs may round otherwise: other
    thread counts, alignments, CPUs) against an uninterrupted run of the same settings.  The two runs'
    fp32 activations differ within the forward bound, so: frames exactly; counts at most at the tokens
    where a neuron is that close to a top-k or sign change (from a hook reference of the activations);
    moments, maxima and top values within the bound; top frames exactly where their values stand further
    apart than it (the last rank's frame competes with values the store does not keep)."""
    straight = tmp_path / "straight.zarr"
    config = CollectConfig(stats=stats, topk_ratio=RATIO, batch_seconds=0.001)
    collect(corpus, load_adapter(str(model_dir)), straight, config, progress=False)
    a, b = xr.open_zarr(out, consolidated=False), xr.open_zarr(straight, consolidated=False)
    assert set(a.data_vars) == set(b.data_vars)
    layers = list(range(AutoConfig.from_pretrained(model_dir).num_hidden_layers))
    ref = hook_reference(corpus, model_dir, "phone-mid", torch.float32, layers)
    np.testing.assert_array_equal(a["frames"].values, b["frames"].values)
    for name in ("topk_count", "positive_count"):
        assert (np.abs(a[name].values - b[name].values) <= ref["slack"][name]).all(), name
    for name in ("mean", "var", "max_abs", "top_value"):
        if name in a:
            assert_within(a[name].values, b[name].values, ref["tolerance"][name], name)
    if "top_value" in a:
        values, delta = b["top_value"].values, ref["tolerance"]["top_value"]
        gap = np.abs(np.diff(values, axis=1)) > 2 * delta  # between ranks r and r + 1
        apart = np.zeros(values.shape, bool)
        apart[:, :-1] = gap  # above the next rank
        apart[:, 1:-1] &= gap[:, :-1]  # and below the one before
        for name in ("top_utterance", "top_frame"):
            np.testing.assert_array_equal(a[name].values[apart], b[name].values[apart], err_msg=name)


@pytest.mark.fp32
def test_resume_after_sigkill_gives_identical_counts(tmp_path, tiny_model, longer_prepared):
    every = [arg for name in TABLE for arg in ("--stat", name)]  # max_abs (opt-in) too
    common = _common(longer_prepared.path, tiny_model) + every
    out = tmp_path / "killed.zarr"
    proc, pointer = _start_and_wait(common, out, min_done=5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = json.loads(pointer.read_text())["progress"]["utterances_done"]
    assert 5 <= done_at_kill < 40, "the run was not interrupted mid-way"
    with pytest.raises(StoreError, match="not complete"):
        open_stats(out)
    info = CliRunner().invoke(main, ["info", str(out)])
    assert "INCOMPLETE" in info.output and "--resume" in info.output
    res = subprocess.run(_cli(*common, "--out", out), env=ENV, capture_output=True, text=True)
    assert res.returncode != 0 and "--resume" in res.stderr
    res = subprocess.run(_cli(*common, "--out", out, "--resume"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert_equals_uninterrupted(out, longer_prepared, tiny_model, tmp_path, tuple(TABLE))
    assert open_stats(out).meta.progress.utterances_done == 40


def test_sigint_stops_at_a_batch_boundary_with_a_checkpoint(tmp_path, tiny_model, prepared):
    common = _common(prepared.path, tiny_model)
    out = tmp_path / "s.zarr"
    proc, pointer = _start_and_wait(common, out, min_done=1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint is saved" in err
    done = json.loads(pointer.read_text())["progress"]["utterances_done"]
    assert 1 <= done < len(prepared)
    res = subprocess.run(_cli(*common, "--out", out, "--resume"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert_equals_uninterrupted(out, prepared, tiny_model, tmp_path)


def test_second_writer_is_refused(prepared, tiny_model, tmp_path):
    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=RATIO), progress=False)
    with StoreWriter(out, StoreMeta.read(out), resume=True):
        with pytest.raises(StoreError, match="being written by pid"):
            collect(
                prepared,
                load_adapter(str(tiny_model)),
                out,
                CollectConfig(topk_ratio=RATIO),
                resume=True,
                progress=False,
            )


def test_incompatible_stores_models_and_corpora(prepared, tiny_model, tmp_path):
    out = tmp_path / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=RATIO), progress=False)
    other = load_adapter(str(save_model(tmp_path / "other", seed=5)))
    with pytest.raises(StoreError, match="collected with other settings .*model"):
        collect(prepared, other, out, CollectConfig(topk_ratio=RATIO), resume=True, progress=False)
    with pytest.raises(StoreError, match="collected with other settings .*model"):  # not "pass --resume"
        collect(prepared, other, out, CollectConfig(topk_ratio=RATIO), progress=False)
    meta = out / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["neurostat_store_format"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="format 99"):
        open_stats(out)
    with pytest.raises(StoreError, match="format 99"):
        collect(prepared, other, out, CollectConfig(topk_ratio=RATIO), resume=True, progress=False)
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    cfg = model_config(num_hidden_layers=1, intermediate_size=9, conv_stride=(5, 2, 2, 2, 2, 2, 1))
    HubertModel(cfg).save_pretrained(tmp_path / "stride160")
    Wav2Vec2FeatureExtractor().save_pretrained(tmp_path / "stride160")
    with pytest.raises(ModelError, match="frame geometry .* differs from the prepared corpus"):
        collect(
            prepared,
            load_adapter(str(tmp_path / "stride160")),
            tmp_path / "g.zarr",
            CollectConfig(),
            progress=False,
        )


def test_changed_audio_is_an_error_naming_the_file(corpus_copy, tiny_model, tmp_path):
    """Audio rewritten after prepare — at the same length too — is an error naming the file (its SHA-1,
    recorded at prepare, is checked where it is decoded); a corpus prepared before audio digests has only
    the length to go by: a recorded skip."""
    import json

    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.prepared import PreparedCorpus, PreparedCorpusError
    from neurostat.frames import default_geometry

    prepare(
        corpus_copy / "LibriSpeech",
        "dev-clean",
        corpus_copy / "alignments",
        tmp_path / "p",
        PrepareSettings(default_geometry()),
        progress=False,
    )
    corpus = PreparedCorpus(tmp_path / "p")
    adapter = load_adapter(str(tiny_model))
    path = corpus[2].audio_path
    wave, sr = sf.read(path)
    sf.write(path, 0.5 * wave, sr)  # the same length, other samples
    assert len(sf.read(path)[0]) == corpus[2].record["num_samples"]
    for jobs in (0, 1):  # in the loop's process and in a data-loading worker
        with pytest.raises(PreparedCorpusError, match=f"{path}: the audio of utterance {corpus[2].id} changed after "):
            collect(corpus, adapter, tmp_path / f"s{jobs}.zarr", CollectConfig(topk_ratio=RATIO, num_jobs=jobs),
                    progress=False)  # fmt: skip
    r = CliRunner().invoke(
        main, ["collect", "--prepared", str(corpus.path), "--model", str(tiny_model), "--out", str(tmp_path / "c")]
    )
    assert r.exit_code == 1 and f"{path}: the audio of utterance" in r.output and "Traceback" not in r.output
    sf.write(path, wave[: len(wave) // 2], sr)
    manifest = corpus.path / "manifest.jsonl"  # as prepared before audio digests
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "audio_sha1"}) + "\n" for r in records))
    meta = json.loads((corpus.path / "meta.json").read_text())  # and before file digests
    (corpus.path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    corpus = PreparedCorpus(corpus.path)
    attrs = collect(corpus, adapter, tmp_path / "s.zarr", CollectConfig(topk_ratio=RATIO), progress=False)
    assert attrs.progress.skips == {"audio-changed": 1}
    info = CliRunner().invoke(main, ["info", str(tmp_path / "s.zarr")]).output
    assert f"counted: {len(corpus) - 1} utterances" in info and "skipped during collect: audio-changed 1" in info
    assert f"collected {len(corpus) - 1} utterances" in describe_collect(attrs, tmp_path / "s.zarr")


def test_a_complete_store_drops_its_checkpoint_state_unless_asked(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model))
    for keep in (False, True):
        out = tmp_path / f"keep{keep}.zarr"
        config = CollectConfig(topk_ratio=RATIO, checkpoint_utterances=2, keep_checkpoint=keep, shard=(0, 3))
        collect(prepared, adapter, out, config, progress=False)
        left = sorted(p.name for p in (out / "neurostat").iterdir() if p.name.startswith(("state-", "checkpoint")))
        assert bool(left) == keep, left
        assert open_stats(out).tokens().values.sum() > 0


def test_max_seconds_cuts_into_pieces_without_losing_frames(prepared, tiny_model, tmp_path):
    attrs = collect(
        prepared,
        load_adapter(str(tiny_model)),
        tmp_path / "s.zarr",
        CollectConfig(topk_ratio=RATIO, tokens="all", max_seconds=0.7),
        progress=False,
    )
    assert attrs.batching["max_seconds"] == 0.7
    assert attrs.progress.utterances_done == len(prepared)  # each counted once, after its last piece
    assert attrs.progress.frames == sum(u.num_frames for u in prepared)
    assert attrs.progress.tokens == sum(int((u.phone_frames() >= 0).sum()) for u in prepared)


@pytest.mark.slow
def test_cli_default_demo_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROSTAT_CACHE", str(tmp_path / "cache"))
    res = CliRunner().invoke(main, ["collect"])
    assert res.exit_code == 0, res.output
    from neurostat.corpus.synth import DEMO_SPEAKERS, DEMO_UTTERANCES
    from neurostat.demo import cache_dir
    from neurostat.select import select_properties

    assert "pre-trained on synthetic" in res.output
    assert f"collected {DEMO_SPEAKERS * DEMO_UTTERANCES} utterances" in res.output
    stats = open_stats(cache_dir() / "stats.zarr")
    assert stats.tokens(("gender",)).values.min() > 0 and stats.meta.statistics["tokens"] == "all"
    assert stats.meta.model["model"] == str(demo_model())
    # what the Quick Start shows: property neurons of every property, in every layer
    selections, _ = select_properties(stats, ("phone-type", "gender", "pitch"))
    for name, selection in selections.items():
        assert min(selection.neurons.counts().values()) > 0, (name, selection.neurons.counts())
    speakers = (cache_dir() / "corpus" / "LibriSpeech" / "SPEAKERS.TXT").read_text()
    trained_on = json.loads((demo_model() / "training.json").read_text())["settings"]
    for variant in TRAINING_VARIANTS:  # the demo corpus speaks with voices the model never heard
        assert f"en-us+{variant} " not in speakers
    demo_ids = {line.split("|")[0].strip() for line in speakers.splitlines() if not line.startswith(";")}
    first, count = trained_on["first_speaker"], trained_on["speakers"]
    assert not demo_ids & {str(1000 + 37 * i) for i in range(first, first + count)}
    res = CliRunner().invoke(main, ["collect"])
    assert res.exit_code == 0, res.output


def test_cli_bad_model_and_missing_corpus(tmp_path, prepared):
    res = CliRunner().invoke(main, ["collect", "--prepared", str(prepared.path), "--model", str(tmp_path / "nope")])
    assert res.exit_code == 1 and "cannot load model" in res.output
    res = CliRunner().invoke(main, ["collect", "--model", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "--prepared" in res.output
    res = CliRunner().invoke(main, ["collect", "--prepared", str(prepared.path), "--model", "x", "--layers", "0"])
    assert res.exit_code == 2 and "numbered from 1" in res.output
    res = CliRunner().invoke(main, ["collect", "--prepared", str(prepared.path), "--model", "x", "--layers", "2-1"])
    assert res.exit_code == 2 and "the range 2-1 is empty; write it low-high, e.g. 1-2" in res.output
    for text in ("1-", "-3", "2,4-"):  # an open range counted one layer (issue 41, item 3)
        res = CliRunner().invoke(main, ["collect", "--prepared", str(prepared.path), "--model", "x", "--layers", text])
        assert res.exit_code == 2 and "is open; give both ends (e.g. 1-12) or all" in res.output, (text, res.output)
    nowhere = str(tmp_path / "nope")  # the option is refused before the (missing) model is looked for
    res = CliRunner().invoke(
        main, ["collect", "--prepared", str(prepared.path), "--model", nowhere, "--batch-seconds", "0"]
    )
    assert res.exit_code == 1 and "--batch-seconds must be positive, got 0.0" in res.output, res.output


@pytest.mark.fp32
def test_triton_backends_collect_equal_torch_backend(prepared, tiny_model, tmp_path):
    """Every backend and both label_stats designs; the store records the design and why it was chosen."""
    adapter = load_adapter(str(tiny_model))
    runs = {"torch": ("torch", "auto"), "triton": ("triton", "auto"), "triton-fused": ("triton-fused", "auto")}
    runs["triton-one-read"] = ("triton", "one-read")
    for name, (backend, design) in runs.items():
        attrs = collect(
            prepared,
            adapter,
            tmp_path / f"{name}.zarr",
            CollectConfig(
                stats=tuple(TABLE),
                topk_ratio=RATIO,
                batch_seconds=5.0,
                backend=backend,
                label_stats_design=design,
                layers=[3],
                shard=(0, 3),
            ),
            progress=False,
        )
        assert attrs.statistics["backend"] == backend
        config = CollectConfig(stats=tuple(TABLE), backend=backend, label_stats_design=design, layers=[3])
        called = RunSpec.resolve(config, adapter, prepared).backend.design  # the design the run calls, as recorded
        assert called == (None if backend == "torch" else attrs.statistics["label_stats"]["design"]), name
        assert attrs.statistics["label_stats"] == {
            "torch": None,
            "triton-one-read": {"design": "one-read", "chosen": "asked for"},
        }.get(name, {"design": "split", "chosen": "the default without a GPU (nothing to time)"})
    a = xr.open_zarr(tmp_path / "torch.zarr", consolidated=False)
    for backend in ("triton", "triton-one-read", "triton-fused"):
        b = xr.open_zarr(tmp_path / f"{backend}.zarr", consolidated=False)
        np.testing.assert_array_equal(a["frames"].values, b["frames"].values)
        for name in ("topk_count", "positive_count"):
            # the fused GEMM rounds differently from the model's own (fp32 here): allow a rare flip
            flips = np.abs(a[name].values - b[name].values).sum()
            assert flips <= (2 if backend == "triton-fused" else 0), (backend, name)
        # the fused GEMM: another fp32 evaluation of the FFN's up-projection, the model's forward before it alike
        tolerance = fp32_tolerances(a, prepared, tiny_model if backend == "triton-fused" else None)
        for name in ("mean", "var", "max_abs"):
            assert_within(a[name].values, b[name].values, tolerance[name], f"{backend} {name}")
        if backend != "triton-fused":  # the same activations: the same maxima
            np.testing.assert_array_equal(a["max_abs"].values, b["max_abs"].values)


def test_triton_backend_needs_cuda_or_interpreter(prepared, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        collect(
            prepared,
            load_adapter(str(tiny_model)),
            tmp_path / "s.zarr",
            CollectConfig(backend="triton"),
            progress=False,
        )


def test_resuming_a_complete_store_does_no_work(prepared, tiny_model, tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    first = collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=RATIO), progress=False)
    adapter = load_adapter(str(tiny_model))
    monkeypatch.setattr(adapter, "encode", lambda waves: pytest.fail("a complete store was recomputed"))
    again = collect(prepared, adapter, out, CollectConfig(topk_ratio=RATIO), resume=True, progress=False)
    assert again.complete and again.progress.tokens == first.progress.tokens


def test_every_front_end_collects_what_the_per_utterance_front_end_collects(prepared, tiny_model, tmp_path):
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    stores = {}
    for front_end in FRONT_ENDS:
        config = CollectConfig(topk_ratio=RATIO, tokens="all", batch_seconds=30.0, front_end=front_end)
        attrs = collect(prepared, adapter, tmp_path / f"{front_end}.zarr", config, progress=False)
        assert attrs.batching["front_end"] == front_end and attrs.progress.padded_frames > attrs.progress.frames
        stores[front_end] = xr.open_zarr(tmp_path / f"{front_end}.zarr", consolidated=False)
    reference = stores["per-utterance"]
    for front_end in ("gemm", "batched"):
        for name in ("frames", "topk_count", "positive_count"):
            np.testing.assert_array_equal(stores[front_end][name].values, reference[name].values, err_msg=front_end)
        for name in ("mean", "var"):
            np.testing.assert_allclose(stores[front_end][name].values, reference[name].values, rtol=1e-10, atol=1e-14)


def test_front_end_option_reaches_the_store(prepared, tiny_model, tmp_path):
    args = ["collect", "--prepared", str(prepared.path), "--model", str(tiny_model), "--device", "cpu"]
    for choice, ran in (("auto", default_front_end("cpu")), ("per-utterance", "per-utterance")):
        out = tmp_path / f"{choice}.zarr"
        result = CliRunner().invoke(main, [*args, "--front-end", choice, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert StoreMeta.read(out).batching["front_end"] == ran and f"{ran} front end" in result.output
    result = CliRunner().invoke(main, [*args, "--front-end", "conv", "--out", str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and "'conv' is not one of 'auto', 'gemm'" in result.output
    with pytest.raises(ValueError, match="unknown --front-end 'conv'"):
        CollectConfig(front_end="conv").check()


def test_padded_batch_budget_and_padding_fraction(prepared):
    from neurostat.engine.batching import padding_fraction, plan_batches

    sr = prepared.geometry.sample_rate
    for seconds in (0.5, 7.0, 30.0):
        batches = plan_batches(prepared, list(range(len(prepared))), seconds, None)
        assert sorted(p.index for b in batches for p in b) == list(range(len(prepared)))
        for b in batches:
            longest = max(p.num_samples for p in b)
            assert len(b) == 1 or len(b) * longest <= seconds * sr  # a longer piece alone
        geo = prepared.geometry
        real = sum(geo.num_frames(p.num_samples) for b in batches for p in b)
        padded = sum(len(b) * max(geo.num_frames(p.num_samples) for p in b) for b in batches)
        assert padding_fraction(prepared, batches) == pytest.approx(1 - real / padded)
    assert padding_fraction(prepared, plan_batches(prepared, [0, 1], 1e-3, None)) == 0.0
    with pytest.raises(ValueError, match="positive"):
        plan_batches(prepared, [0], -5, None)


def test_data_wait_share_is_measured(prepared, tiny_model, tmp_path, monkeypatch):
    """A deliberately slow dataset: each batch costs a known 1 s sleep, which the measured wait must hold
    (however slow the computing is under CPU load) and which the loop's time holds in turn."""
    from neurostat.engine.batching import BatchDataset

    fast = BatchDataset.__getitem__
    slept = []

    def slow(self, i):
        time.sleep(1.0)
        slept.append(1.0)
        return fast(self, i)

    monkeypatch.setattr(BatchDataset, "__getitem__", slow)
    config = CollectConfig(topk_ratio=RATIO, batch_seconds=10.0, num_jobs=0, shard=(0, 4))
    attrs = collect(prepared, load_adapter(str(tiny_model)), tmp_path / "s.zarr", config, progress=False)
    p = attrs.progress
    assert slept and 0.99 * sum(slept) <= p.data_wait_seconds <= p.loop_seconds
    share = round(100 * p.data_wait_seconds / p.loop_seconds)
    assert f"waiting for data {share}% of the loop" in describe_collect(attrs, tmp_path / "s.zarr")


def test_resume_right_after_a_kill_while_loader_workers_linger(prepared, tiny_model, tmp_path):
    """Killing the run leaves its data-loading workers alive for a few seconds; they must not hold the lock."""
    common = _common(prepared.path, tiny_model)
    common[common.index("-j") + 1] = 2
    out = tmp_path / "s.zarr"
    proc, pointer = _start_and_wait(common, out, min_done=2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")]
    with open(out / "neurostat" / "writer.lock", "a+") as lock:  # at once: the workers may still be alive
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if one still held it
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert workers and alive, "the test needs data-loading workers that outlive the killed run"
    res = subprocess.run(_cli(*common, "--out", out, "--resume"), env=ENV, capture_output=True, text=True)
    assert res.returncode == 0 and "being written" not in res.stderr, res.stderr
    assert open_stats(out).meta.progress.utterances_done == len(prepared)


def test_a_full_disk_keeps_the_last_checkpoint_and_the_resume_is_exact(prepared, tiny_model, tmp_path):
    """A 1.6 MB tmpfs takes one checkpoint (~1.2 MB of state) but not a second beside it."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        common = _common(prepared.path, tiny_model)
        res = subprocess.run(
            _cli(*common, "--out", disk / "s.zarr", "--checkpoint-utterances", 3),
            env=ENV,
            capture_output=True,
            text=True,
        )
        assert res.returncode == 1 and "the disk is full" in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert "\nError: " in res.stderr  # on a line of its own, not after the progress bar's
        kept = json.loads((disk / "s.zarr" / "neurostat" / "checkpoint.json").read_text())["progress"]
        assert 3 <= kept["utterances_done"] < len(prepared) and f"({kept['utterances_done']} utterances)" in res.stderr
        shutil.copytree(disk / "s.zarr", tmp_path / "moved.zarr")  # the store, moved to a disk with room
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    res = subprocess.run(
        _cli(*common, "--out", tmp_path / "moved.zarr", "--resume"), env=ENV, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert_equals_uninterrupted(tmp_path / "moved.zarr", prepared, tiny_model, tmp_path)


def test_debug_shows_the_traceback(prepared, tmp_path):
    args = ["collect", "--prepared", str(prepared.path), "--model", str(tmp_path / "no" / "dir")]
    assert CliRunner().invoke(main, args).exit_code == 1
    r = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(r.exception, ModelError) and "no such directory" in str(r.exception)
