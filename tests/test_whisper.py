"""Whisper encoders (issue 32): collected like the wav2vec2 family's FFNs, utterances cut into Whisper's fixed
windows (short ones padded as Whisper pads them), labels on the encoder frames by their centres, and counts
equal to a per-window float64 forward of the HF encoder with hooks."""

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import transformers
import xarray as xr
from click.testing import CliRunner
from float64_reference import phone_mid, stats_reference
from rounding import FORWARD_BOUND, forward_path, unit_roundoff
from test_readme import python_block

from neurostat.cli import main
from neurostat.corpus.prepare import PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus
from neurostat.corpus.textgrid import Interval, read_textgrid, write_textgrid
from neurostat.engine.batching import BatchDataset, plan_batches
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.features import layer_features
from neurostat.frames import label_frames
from neurostat.labelspace import LabelSpace
from neurostat.model import factory
from neurostat.model.families import ModelError
from neurostat.model.loading import load_adapter, load_geometry
from neurostat.model.whisper import WhisperAdapter
from neurostat.store import StoreError

RATIO = 0.1  # k = round(0.1 * 96) = 10
WINDOW_SECONDS = 2  # the tiny model's window: 100 encoder frames of 20 ms
SHORT = "1000-27-0002"  # cut to 0.2 s
KNOWN = "1037-397-0000"  # phones at known times around the first window boundary
KNOWN_PHONES = [(0.0, 1.9, "AA1"), (1.9, 1.99, "B"), (1.99, 2.01, "S"), (2.01, 2.05, "K"), (2.05, 2.5, "IY0")]


def save_whisper(path, head: bool = False) -> str:
    """The tiny random Whisper (a WhisperModel, or with ``head`` a WhisperForConditionalGeneration) of
    2 s windows, saved with its feature extractor."""
    return str(factory.save_whisper(path, head=head, chunk_length=WINDOW_SECONDS))


def load_feature_extractor(model_dir: str):
    return transformers.WhisperFeatureExtractor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> str:
    return save_whisper(tmp_path_factory.mktemp("whisper") / "m")


@pytest.fixture(scope="module")
def whisper_corpus(demo_corpus, tmp_path_factory):
    """The demo corpus with one utterance cut to 0.2 s and one whose phones sit at known times, prepared
    for the tiny Whisper's geometry."""
    root = tmp_path_factory.mktemp("whisper-corpus")
    shutil.copytree(demo_corpus, root / "c")
    speech = root / "c" / "LibriSpeech" / "dev-clean"
    short = next(speech.rglob(f"{SHORT}.flac"))
    wave, sr = sf.read(short, dtype="float32")
    sf.write(short, wave[: sr // 5], sr)
    grid = next((root / "c" / "alignments").rglob(f"{SHORT}.TextGrid"))
    write_textgrid(grid, 0.2, {"words": [Interval(0.0, 0.2, "A")], "phones": [Interval(0.0, 0.2, "AH0")]})
    grid = next((root / "c" / "alignments").rglob(f"{KNOWN}.TextGrid"))
    end = read_textgrid(grid).xmax
    phones = [Interval(a, b, p) for a, b, p in KNOWN_PHONES] + [Interval(KNOWN_PHONES[-1][1], end, "")]
    write_textgrid(grid, end, {"words": [Interval(0.0, end, "A")], "phones": phones})
    geometry = load_geometry(save_whisper(root / "model"))
    prepare(
        speech.parent, "dev-clean", root / "c" / "alignments", root / "p", PrepareSettings(geometry), progress=False
    )
    return PreparedCorpus(root / "p")


def encoder_activations(model_dir: str, wave: np.ndarray) -> dict[int, np.ndarray]:
    """Each layer's FFN activations [frames, D] of one utterance: the HF encoder in float64 on each of its
    windows alone (the feature extractor pads it), activations taken by forward hooks, the frames whose
    centre lies inside the audio kept (ceil(samples / 320) for 20 ms frames)."""
    model = transformers.WhisperModel.from_pretrained(model_dir, dtype=torch.float64).eval()
    fe = transformers.WhisperFeatureExtractor.from_pretrained(model_dir)
    stride = fe.hop_length * fe.nb_max_frames // model.config.max_source_positions
    captured, out = {}, {}
    for i, layer in enumerate(model.encoder.layers):
        layer.activation_fn.register_forward_hook(lambda m, inp, o, i=i: captured.__setitem__(i, o))
    for start in range(0, len(wave), fe.n_samples):
        window = wave[start : start + fe.n_samples]
        features = fe(window, sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
        with torch.no_grad():
            model.encoder(features.double())
        for i, a in captured.items():
            out.setdefault(i, []).append(a[0, : -(-len(window) // stride)].numpy())
    return {i: np.concatenate(a) for i, a in out.items()}


def hook_reference(corpus: PreparedCorpus, model_dir: str, mode: str) -> dict[str, np.ndarray]:
    """Float64 statistics of :func:`encoder_activations` over the corpus's tokens (``all`` or ``phone-mid``)."""
    space = LabelSpace.of_corpus(corpus)
    rows: dict[int, list] = {}
    for utt in corpus:
        wave, sr = sf.read(utt.audio_path, dtype="float32")
        acts = encoder_activations(model_dir, wave)
        phones, joint = utt.phone_frames(), space.joint_frames(utt)
        assert all(len(a) == len(phones) for a in acts.values())
        frames = phone_mid(phones) if mode == "phone-mid" else np.flatnonzero(phones >= 0)
        for layer, a in acts.items():
            rows.setdefault(layer, []).extend((a[t], int(joint[t])) for t in frames)
    width = next(iter(rows.values()))[0][0].shape[0]
    return stats_reference(rows, space.size, width, max(1, round(RATIO * width)))


def assert_store_equals(path, ref) -> None:
    ds = xr.open_zarr(path, consolidated=False)
    for name in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(ds[name].values, ref[name], err_msg=name)
    for name in ("mean", "var"):
        np.testing.assert_allclose(ds[name].values, ref[name], rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "mel_bins, padding, dtype", [(80, 0.0, torch.float32), (128, 0.25, torch.float32), (80, 0.0, torch.bfloat16)]
)
def test_the_adapters_log_mel_equals_the_feature_extractors(tmp_path, mel_bins, padding, dtype):
    """The log-mel the adapter computes where the batch is (a zero-padded batch and its lengths) equals the
    checkpoint's WhisperFeatureExtractor (numpy in, padded to the window with its padding value) exactly, for
    waveforms from 1 sample to a whole window in one batch; a bf16 model gets the same features rounded to
    bf16."""
    path = factory.save_whisper(tmp_path / "m", chunk_length=WINDOW_SECONDS, num_mel_bins=mel_bins)
    transformers.WhisperFeatureExtractor(
        feature_size=mel_bins, chunk_length=WINDOW_SECONDS, padding_value=padding
    ).save_pretrained(path)
    adapter = load_adapter(str(path), dtype=dtype)
    fe = adapter.feature_extractor
    g = torch.Generator().manual_seed(mel_bins)
    lengths = [1, 17, fe.hop_length * 3 + 1, fe.n_samples // 3, fe.n_samples - 1, fe.n_samples]
    waves = [torch.randn(n, generator=g) * 0.1 for n in lengths]
    waves[2][:] = 0.0  # silence: every bin clamps to the floor
    expected = fe([w.numpy() for w in waves], sampling_rate=fe.sampling_rate, return_tensors="pt").input_features
    batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
    got = adapter.log_mel(batch, torch.tensor(lengths))
    assert got.shape == (len(lengths), mel_bins, fe.nb_max_frames) and got.dtype == dtype
    assert torch.equal(got, expected.to(dtype))


@pytest.mark.parametrize("mode", ["all", "phone-mid"])
def test_float64_counts_equal_the_per_window_hook_reference(whisper_corpus, whisper_dir, tmp_path, mode):
    adapter = load_adapter(whisper_dir, dtype=torch.float64)
    assert isinstance(adapter, WhisperAdapter) and adapter.width == 96 and adapter.num_layers == 2
    config = CollectConfig(topk_ratio=RATIO, tokens=mode, batch_seconds=3 * WINDOW_SECONDS)
    meta = collect(whisper_corpus, adapter, tmp_path / "s.zarr", config, progress=False)
    ref = hook_reference(whisper_corpus, whisper_dir, mode)
    assert_store_equals(tmp_path / "s.zarr", ref)
    assert meta.progress.tokens == ref["frames"].sum() and meta.progress.utterances_done == len(whisper_corpus)
    windows = [-(-u.record["num_samples"] // adapter.geometry.window) for u in whisper_corpus]
    assert max(windows) >= 3 and min(windows) == 1  # utterances over several windows, and within one


def test_utterances_are_cut_at_window_boundaries(whisper_corpus):
    geo = whisper_corpus.geometry
    assert (geo.window, geo.window_frames, geo.stride) == (WINDOW_SECONDS * 16000, 50 * WINDOW_SECONDS, 320)
    pieces = [p for batch in plan_batches(whisper_corpus, list(range(len(whisper_corpus))), 5.0, None) for p in batch]
    for i, utt in enumerate(whisper_corpus):
        mine = sorted((p for p in pieces if p.index == i), key=lambda p: p.sample_start)
        n = utt.record["num_samples"]
        assert [p.sample_start for p in mine] == list(range(0, n, geo.window))
        assert [p.frame_start for p in mine] == [k * geo.window_frames for k in range(len(mine))]
        assert sum(p.num_samples for p in mine) == n and all(p.num_samples <= geo.window for p in mine)
        assert sum(geo.num_frames(p.num_samples) for p in mine) == geo.num_frames(n) == -(-n // 320)


def test_a_short_utterance_is_padded_as_whisper_pads_it(whisper_dir):
    """0.2 s (10 frames), a sample, a full window and a window and a bit less, in one batch: each equals its
    own window's float64 forward, at its frames inside the audio."""
    adapter = load_adapter(whisper_dir, dtype=torch.float64)
    rng = np.random.default_rng(0)
    lengths = [3200, 1, adapter.geometry.window, 17001]
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in lengths]
    got: dict[int, torch.Tensor] = {}
    with adapter.observe(lambda layer, a: got.__setitem__(layer, a.clone())):
        hidden, mask = adapter.encode([torch.from_numpy(w) for w in waves])
    assert mask.sum(1).tolist() == [10, 1, 100, 54] and mask.shape == (4, 100)
    for b, wave in enumerate(waves):
        ref = encoder_activations(whisper_dir, wave)
        for layer, a in ref.items():
            n = len(a)
            assert n == mask[b].sum()
            np.testing.assert_allclose(got[layer][b, :n].numpy(), a, rtol=1e-12, atol=1e-12)
    with pytest.raises(ModelError, match="windows of at most 32000 samples"):
        adapter.encode([torch.zeros(adapter.geometry.window + 1)])


def test_padding_is_never_counted(whisper_corpus, whisper_dir, tmp_path):
    """Every row of a batch is a whole window of frames; the frames past a piece's audio are never tokens."""
    geo = whisper_corpus.geometry
    space = LabelSpace.of_corpus(whisper_corpus)
    batches = plan_batches(whisper_corpus, list(range(len(whisper_corpus))), 4 * WINDOW_SECONDS, None)
    data = BatchDataset(whisper_corpus, batches, load_feature_extractor(whisper_dir), "all", space)
    padded = 0
    for i, batch in enumerate(batches):
        item = data[i]
        index = item["tokens"].index.numpy()
        rows, frames = index // geo.window_frames, index % geo.window_frames
        valid = np.array([geo.num_frames(p.num_samples) for p in batch])
        assert (frames < valid[rows]).all() and item["padded_frames"] == len(batch) * geo.window_frames
        padded += item["padded_frames"] - item["frames"]
    assert padded > 0
    meta = collect(
        whisper_corpus,
        load_adapter(whisper_dir),
        tmp_path / "s.zarr",
        CollectConfig(tokens="all", stats=("topk",)),
        progress=False,
    )
    labelled = sum(int((u.phone_frames() >= 0).sum()) for u in whisper_corpus)
    assert meta.progress.tokens == labelled == xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["frames"].sum()
    assert meta.progress.frames == sum(geo.num_frames(u.record["num_samples"]) for u in whisper_corpus)


def test_textgrid_labels_land_on_the_right_encoder_frames(whisper_corpus, whisper_dir):
    """Frame t of the utterance (window t // 100, its frame t % 100) is centred at 0.02 t s, Whisper's own
    timestamp of that encoder frame: the phones around the first window boundary land on frames 94..103."""
    utt = next(u for u in whisper_corpus if u.id == KNOWN)
    phones = [whisper_corpus.phones[p] if p >= 0 else None for p in utt.phone_frames()]
    expected = {94: "AA", 95: "B", 99: "B", 100: "S", 101: "K", 102: "K", 103: "IY", 124: "IY", 125: "sil"}
    assert {t: phones[t] for t in expected} == expected
    np.testing.assert_allclose(whisper_corpus.geometry.centres(126)[[0, 99, 100, 125]], [0.0, 1.98, 2.0, 2.5])
    starts, ends, ids = (np.array(v) for v in zip(*[(a, b, i) for i, (a, b, _) in enumerate(KNOWN_PHONES)]))
    by_hand = label_frames(starts, ends, ids, 0.02 * np.arange(126))
    assert [KNOWN_PHONES[i][2].rstrip("0123456789") for i in by_hand[:125]] == phones[:125]
    # the engine gives the second window's piece the labels of frames 100.. of the utterance
    space = LabelSpace.of_corpus(whisper_corpus, ("phone",))
    index = next(i for i, u in enumerate(whisper_corpus) if u.id == KNOWN)
    batches = [b for b in plan_batches(whisper_corpus, [index], 1.0, None)]
    data = BatchDataset(whisper_corpus, batches, load_feature_extractor(whisper_dir), "all", space)
    second = next(i for i, b in enumerate(batches) if b[0].sample_start == whisper_corpus.geometry.window)
    tokens = data[second]["tokens"]
    labels = tokens.labels[tokens.local].numpy()
    assert [space.names()["phone"][label] for label in labels[:4]] == ["S", "K", "K", "IY"]
    assert (tokens.frame_ids.numpy()[:4] & 0xFFFFFFFF).tolist() == [100, 101, 102, 103]


def test_a_generation_checkpoint_collects_its_encoders_counts(whisper_corpus, tmp_path):
    full = save_whisper(tmp_path / "full", head=True)
    encoder = save_whisper(tmp_path / "encoder")
    assert torch.equal(
        transformers.WhisperForConditionalGeneration.from_pretrained(full).model.encoder.layers[1].fc1.weight,
        transformers.WhisperModel.from_pretrained(encoder).encoder.layers[1].fc1.weight,
    )
    config = CollectConfig(topk_ratio=RATIO, tokens="all", stats=("topk", "positive"))
    metas = {
        name: collect(whisper_corpus, load_adapter(src), tmp_path / f"{name}.zarr", config, progress=False)
        for name, src in (("full", full), ("encoder", encoder))
    }
    a, b = (xr.open_zarr(tmp_path / f"{n}.zarr", consolidated=False) for n in metas)
    for var in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(a[var].values, b[var].values)
    assert a["topk_count"].values.sum() > 0
    assert metas["full"].model["head"] == (
        "WhisperForConditionalGeneration: its decoder and head are not collected, its encoder is"
    )
    assert metas["encoder"].model["head"] == "WhisperModel: its decoder is not collected, its encoder is"
    assert metas["full"].model["model_type"] == "whisper"


def test_cli_collects_a_whisper_folder_and_info_names_the_family(whisper_corpus, whisper_dir, tmp_path):
    out = tmp_path / "s.zarr"
    args = ["collect", "--prepared", str(whisper_corpus.path), "--model", whisper_dir, "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--stat", "topk", "--tokens", "all"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["info", str(out)])
    assert res.exit_code == 0, res.output
    assert "whisper" in res.output and "WhisperModel: its decoder is not collected, its encoder is" in res.output
    assert "forward: whisper-log-mel front end on cpu; group norm: none (log-mel features" in res.output
    assert "frame mask: none to the encoder: each window is padded as Whisper pads it" in res.output
    res = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "t.zarr"), "--max-seconds", "1"])
    assert res.exit_code != 0 and "leave --max-seconds out" in res.output


def test_a_window_that_is_not_whole_encoder_frames_is_refused(tmp_path):
    path = tmp_path / "bad"
    transformers.WhisperModel(factory.whisper_config(max_source_positions=70)).save_pretrained(path)
    factory.whisper_feature_extractor(chunk_length=WINDOW_SECONDS).save_pretrained(path)
    with pytest.raises(ModelError, match=f"{path}: a window of 32000 samples .* 70 max_source_positions"):
        load_adapter(str(path))
    with pytest.raises(ModelError, match="70 max_source_positions"):
        load_geometry(str(path))


def test_a_wav2vec2_corpus_is_refused_for_whisper(prepared, whisper_dir, tmp_path):
    with pytest.raises((ModelError, StoreError), match="frame geometry .* differs from the prepared corpus"):
        collect(prepared, load_adapter(whisper_dir), tmp_path / "s.zarr", CollectConfig(), progress=False)


@pytest.mark.fp32
def test_layer_features_join_an_utterances_windows(whisper_corpus, whisper_dir):
    adapter = load_adapter(whisper_dir, dtype=torch.float64)
    every = list(range(len(whisper_corpus)))
    got = dict(layer_features(whisper_corpus, adapter, every, [2], batch_seconds=5.0, num_jobs=0, progress=False))
    assert sorted(got) == sorted(u.id for u in whisper_corpus)
    utt = max(whisper_corpus, key=lambda u: u.record["num_samples"])
    wave, _ = sf.read(utt.audio_path, dtype="float32")
    layer = adapter.backbone.encoder.layers[1]
    outputs = []
    handle = layer.register_forward_hook(lambda m, inp, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    window, fe = adapter.geometry.window, adapter.feature_extractor
    for start in range(0, len(wave), window):
        piece = wave[start : start + window]
        with torch.no_grad():
            adapter.backbone.encoder(fe(piece, sampling_rate=16000, return_tensors="pt").input_features.double())
        outputs[-1] = outputs[-1][0, : adapter.geometry.num_frames(len(piece))]
    handle.remove()
    expected = torch.cat(outputs)
    assert got[utt.id].shape == (utt.num_frames, 1, 64) and len(outputs) >= 3
    # float64 forwards of float32 log-mel features computed by two codes (the extractor's numpy, the engine's
    # torch: an STFT of n_fft terms, then the mel filters' sums over its bins), the output rounded to float32
    n_fft = fe.n_fft
    path = forward_path(adapter.config, adapter.geometry.num_frames(window))[-1]
    mel = n_fft + n_fft // 2 + 1
    scale = expected.abs().max()
    bound = 2 * unit_roundoff(torch.float32) * (expected.abs() + mel * scale)
    bound += 2 * path * unit_roundoff(torch.float64) * scale
    assert ((got[utt.id][:, 0].double() - expected).abs() <= bound).all(), FORWARD_BOUND


def test_the_readme_whisper_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(python_block("**Whisper encoders.**"), "README.md", "exec"), scope)
    assert scope["meta"].model["model_type"] == "whisper" and scope["meta"].progress.tokens > 0
    assert scope["adapter"].geometry.window == 30 * 16000 and scope["adapter"].geometry.window_frames == 1500


def test_a_dithering_feature_extractor_is_refused(whisper_dir, tmp_path):
    shutil.copytree(whisper_dir, tmp_path / "m")
    fe = load_feature_extractor(whisper_dir)
    fe.dither = 1e-4
    fe.save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match=r"/m: its feature extractor dithers \(dither=0.0001\)"):
        load_adapter(str(tmp_path / "m"))


def test_the_papers_overlap_grid_is_refused_for_whisper_frames(whisper_corpus):
    from neurostat.corpus.prepare import PrepareError

    with pytest.raises(PrepareError, match="--frame-labels overlap .* label by centre"):
        PrepareSettings.from_options(whisper_corpus.geometry, frame_labels="overlap")


@pytest.mark.fp32
def test_pruned_and_ablated_whisper_checkpoints_keep_their_class_and_agree(tmp_path):
    """Pruning a neuron and zeroing its W2 column are the same edit: a pruned Whisper checkpoint (kept
    neurons only) and the original with the pruned neurons ablated give the same encoder outputs."""
    from neurostat.model.edit import ablate_checkpoint
    from neurostat.model.provenance import EditRecord
    from neurostat.model.pruning import prune_checkpoint
    from neurostat.neuronset import NeuronSet

    source = save_whisper(tmp_path / "m", head=True)
    width = load_adapter(source).width
    kept = prune_checkpoint(source, tmp_path / "pruned", ratio=0.4).kept
    dropped = NeuronSet({layer: set(range(width)) - set(idx) for layer, idx in kept.items()}, len(kept), width)
    dropped.save(tmp_path / "dropped.json")
    ablate_checkpoint(source, tmp_path / "dropped.json", tmp_path / "ablated")
    pruned, ablated = load_adapter(str(tmp_path / "pruned")), load_adapter(str(tmp_path / "ablated"))
    assert isinstance(pruned, WhisperAdapter) and isinstance(ablated, WhisperAdapter)
    for edited in ("pruned", "ablated"):
        assert EditRecord.read(tmp_path / edited).architecture == "WhisperForConditionalGeneration"
    assert [f.width for f in pruned.ffns] == [len(kept[layer]) for layer in sorted(kept)] != [width] * len(kept)
    g = torch.Generator().manual_seed(5)
    waves = [torch.randn(n, generator=g) for n in (3_000, 31_000)]
    with torch.no_grad():
        (hp, mp), (ha, ma) = pruned.encode(waves), ablated.encode(waves)
    rtol = 2 * forward_path(pruned.config, pruned.geometry.num_frames(31_000))[-1] * unit_roundoff(torch.float32)
    assert torch.equal(mp, ma) and (hp[mp] - ha[ma]).abs().max() <= rtol * ha[ma].abs().max(), FORWARD_BOUND
