"""The family table and what a store records of the model that wrote it (issue 39): the records come from the
loaded model and the run's settings, never assumed."""

import json

import numpy as np
import pytest
import torch
import xarray as xr
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


def _table_names() -> set[str]:
    """The transformers attribute names the family table and its input readers use: every module path of the
    table, and every attribute they read of a config or a feature extractor."""
    import ast
    from pathlib import Path

    from neurostat.model.families import FAMILIES

    names = set()
    for f in FAMILIES.values():
        paths = [*f.backbones, f.encoder, f.layers, f.conv_layers, f.projection, f.positional, *f.convs]
        paths += [p for place in f.ffns for p in (place.container, place.up, place.act, place.down)]
        names |= {a for p in paths if p for a in p.split(".")} | {f.activation}
    root = Path(__file__).resolve().parent.parent / "neurostat" / "model"
    for file in ("families.py", "inputs.py"):
        for node in ast.walk(ast.parse((root / file).read_text())):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("config", "encoder", "fe", "feature_extractor"):
                    names.add(node.attr)
    from neurostat.frames import FrameGeometry
    from neurostat.model.inputs import LogMelSettings

    own = {n for n in dir(FrameGeometry) if not n.startswith("_")} | {*FrameGeometry.__dataclass_fields__}
    own |= {*LogMelSettings.__dataclass_fields__}
    own.add("feature_extractor")  # the adapter's own attribute, a wav2vec2 backbone's too
    return names - own - {"", "encoder", "layers", "model", "activation"}  # neurostat's own; words too plain


def test_transformers_names_appear_only_in_the_family_table():
    """No module outside the table and its input readers reaches a part of a model, a config or a feature
    extractor by transformers' attribute name (the test models' factory builds configs, so it may)."""
    import ast
    from pathlib import Path

    hf = _table_names()
    assert {"intermediate_dense", "fc1", "feed_forward", "pos_conv_embed", "max_source_positions", "hop_length"} <= hf
    root = Path(__file__).resolve().parent.parent / "neurostat"
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() in ("model/families.py", "model/inputs.py", "model/factory.py"):
            continue
        if path.relative_to(root).parts[0] == "corpus":  # never holds a model (test_architecture): a Lhotse
            continue  # recording's sampling_rate is Lhotse's
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr"):
                arg = node.args[1] if len(node.args) > 1 else None
                name = arg.value if isinstance(arg, ast.Constant) else None
            if name in hf:
                found.append(f"{path.relative_to(root)}:{node.lineno} .{name}")
    assert not found, found


def test_no_file_of_the_model_package_is_over_300_lines():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "neurostat" / "model"
    sizes = {p.name: len(p.read_text().splitlines()) for p in root.glob("*.py")}
    assert max(sizes.values()) <= 320, sizes


# ---- every family collects exactly what its own HF forward computes, one utterance at a time, in float64 ----

RATIO = 0.1  # k = round(0.1 * 37) = 4
SHORT = "1000-27-0002"  # cut to 0.3 s: a few frames beside utterances of seconds, in the same batch


def _ffn_activations(model_type: str, model):
    """Each FFN's activation module in layer-axis order, found by transformers' own names (independent of the
    family table)."""
    if model_type == "parakeet":
        encoder = model.encoder if hasattr(model, "ctc_head") else model
        return [m for layer in encoder.layers for m in (layer.feed_forward1.activation, layer.feed_forward2.activation)]
    base = getattr(model, model.base_model_prefix, model) if not hasattr(model, "encoder") else model
    layers = base.encoder.layers
    if model_type in ("wav2vec2-conformer", "wav2vec2-bert"):
        return [m for layer in layers for m in (layer.ffn1.intermediate_act_fn, layer.ffn2.intermediate_act_fn)]
    return [layer.feed_forward.intermediate_act_fn for layer in layers]


def _hf_forward(model_type: str, model, fe, wave):
    """The model's own forward on one utterance alone, as its feature extractor prepares it; the number of
    encoder frames it has."""
    if model_type in ("wav2vec2-bert", "parakeet"):
        x = fe(wave, sampling_rate=fe.sampling_rate, return_tensors="pt", return_attention_mask=True)
        features = x.input_features.double()
        if model_type == "wav2vec2-bert":
            model(input_features=features, attention_mask=x.attention_mask)
            return int(x.attention_mask.sum())
        encoder = model.encoder if hasattr(model, "ctc_head") else model  # ParakeetForCTC: its encoder alone
        return int(encoder(input_features=features, attention_mask=x.attention_mask).attention_mask.sum())
    x = torch.from_numpy(fe(wave, sampling_rate=fe.sampling_rate, return_tensors="np").input_values[0]).double()
    out = model(x[None])
    return out.last_hidden_state.shape[1] if hasattr(out, "last_hidden_state") else out.logits.shape[1]


def hook_reference(corpus, model_dir, model_type: str, tokens: str) -> dict:
    """Float64 statistics of the HF forward of each utterance alone, activations taken by forward hooks."""
    import soundfile as sf
    import transformers
    from float64_reference import phone_mid, stats_reference

    from neurostat.labelspace import LabelSpace

    config = transformers.AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, (config.architectures or [None])[0] or "AutoModel", transformers.AutoModel)
    model = cls.from_pretrained(model_dir, dtype=torch.float64).eval()
    fe = transformers.AutoFeatureExtractor.from_pretrained(model_dir)
    acts = _ffn_activations(model_type, model)
    captured = {}
    for i, act in enumerate(acts):
        act.register_forward_hook(lambda m, inp, out, i=i: captured.__setitem__(i, out[0].numpy()))
    space = LabelSpace.of_corpus(corpus)
    rows = {i: [] for i in range(len(acts))}
    for utt in corpus:
        wave, _ = sf.read(utt.audio_path, dtype="float32")
        with torch.no_grad():
            frames = _hf_forward(model_type, model, fe, wave)
        phones, joint = utt.phone_frames(), space.joint_frames(utt)
        assert frames == len(phones), (utt.record["id"], frames, len(phones))  # the geometry's count is the model's
        chosen = phone_mid(phones) if tokens == "phone-mid" else [t for t in range(frames) if phones[t] >= 0]
        for i in rows:
            rows[i].extend((captured[i][t], int(joint[t])) for t in chosen)
    width = captured[0].shape[-1]
    return stats_reference(rows, space.size, width, max(1, round(RATIO * width)))


@pytest.fixture(scope="module")
def short_corpus(demo_corpus, tmp_path_factory):
    """The demo corpus with one utterance cut to 0.3 s."""
    import shutil

    import soundfile as sf

    from neurostat.corpus.textgrid import Interval, write_textgrid

    root = tmp_path_factory.mktemp("families") / "c"
    shutil.copytree(demo_corpus, root)
    short = next((root / "LibriSpeech").rglob(f"{SHORT}.flac"))
    wave, sr = sf.read(short, dtype="float32")
    sf.write(short, wave[: 3 * sr // 10], sr)
    grid = next((root / "alignments").rglob(f"{SHORT}.TextGrid"))
    write_textgrid(grid, 0.3, {"words": [Interval(0.0, 0.3, "A")], "phones": [Interval(0.0, 0.3, "AH0")]})
    return root


_PREPARED: dict = {}


def prepared_for(root, geometry, tmp_path_factory):
    """The corpus at ``root`` prepared for ``geometry`` (once per geometry)."""
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.prepared import PreparedCorpus

    if geometry not in _PREPARED:
        out = tmp_path_factory.mktemp("prepared")
        prepare(root / "LibriSpeech", "dev-clean", root / "alignments", out, PrepareSettings(geometry), progress=False)
        _PREPARED[geometry] = PreparedCorpus(out)
    return _PREPARED[geometry]


def _family(name: str, *values):
    """A test parameter of the family ``name`` (and ``values``), skipped with the reason where the installed
    transformers lacks the family's classes (the floors run of CI)."""
    from neurostat.model.families import family_named

    why = family_named(name).unavailable()
    return pytest.param(name, *values, marks=pytest.mark.skipif(why is not None, reason=why or ""))


@pytest.mark.parametrize(
    "model_type, head",
    [
        _family("unispeech", False),
        _family("unispeech-sat", True),
        _family("wav2vec2-conformer", False),
        _family("wav2vec2-conformer", True),
        _family("wav2vec2-bert", False),
        _family("parakeet", False),
        _family("parakeet", True),
    ],
)
def test_float64_counts_equal_the_hook_reference(short_corpus, tmp_path_factory, tmp_path, model_type, head):
    """Counts exactly and moments to 1e-10 of the HF forward of each utterance alone, for every FFN of the layer
    axis, with a 0.3 s utterance and utterances of seconds padded into one batch; a fine-tuned checkpoint's head
    is left out and named."""
    from neurostat.model.loading import load_geometry

    model_dir = str(save_model(tmp_path / "m", model_type, head=head))
    corpus = prepared_for(short_corpus, load_geometry(model_dir), tmp_path_factory)
    adapter = load_adapter(model_dir, dtype=torch.float64)
    config = CollectConfig(stats=("topk", "positive", "moments"), topk_ratio=RATIO, tokens="all", batch_seconds=60.0)
    meta = collect(corpus, adapter, tmp_path / "s.zarr", config, progress=False)
    assert (meta.model["family"], meta.model["head"] is not None) == (family_of_type(model_type), head)
    lengths = [u.record["num_samples"] for u in corpus]
    assert min(lengths) < 0.5 * 16000 < 2 * 16000 < max(lengths)
    ref = hook_reference(corpus, model_dir, model_type, "all")
    ds = xr.open_zarr(tmp_path / "s.zarr", consolidated=False)
    assert ds["ffn"].values.tolist() == adapter.entries and len(adapter.entries) == ds.sizes["layer"]
    for name in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(ds[name].values, ref[name], err_msg=name)
    for name in ("mean", "var"):
        np.testing.assert_allclose(ds[name].values, ref[name], rtol=1e-10, atol=1e-12, err_msg=name)


def family_of_type(model_type: str) -> str:
    from neurostat.model.families import family_named

    return family_named(model_type).key


@pytest.mark.parametrize("model_type", [_family("wav2vec2-conformer"), _family("parakeet")])
def test_a_pruned_conformer_equals_the_original_with_the_pruned_neurons_ablated(tmp_path, model_type):
    """Both FFNs of every Conformer layer are entries of the layer axis, both pruned; the pruned checkpoint
    (its CTC head kept) computes what the original computes with the pruned neurons ablated."""
    import transformers

    from neurostat.model.edit import ablated
    from neurostat.model.loading import load_full_model, load_pruned
    from neurostat.model.pruning import prune_checkpoint
    from neurostat.neuronset import NeuronSet

    source = str(save_model(tmp_path / "m", model_type, head=True))
    result = prune_checkpoint(source, tmp_path / "pruned", ratio=0.4)
    entries = load_adapter(source).entries
    layers = 3 if model_type == "wav2vec2-conformer" else 2
    assert len(entries) == 2 * layers and set(result.kept) == set(range(1, 2 * layers + 1))  # ffn1, ffn2 each
    assert all(len(kept) == round(0.4 * 37) for kept in result.kept.values())
    removed = NeuronSet({e: set(range(37)) - set(kept) for e, kept in result.kept.items()}, len(entries), 37)
    original, pruned = load_full_model(source).double(), load_pruned(tmp_path / "pruned").double()
    assert type(pruned) is type(original)
    wave = np.random.default_rng(0).standard_normal(9000).astype(np.float32) * 0.1
    if model_type == "parakeet":
        fe = transformers.AutoFeatureExtractor.from_pretrained(source)
        x = fe(wave, sampling_rate=16000, return_tensors="pt")
        inputs = dict(input_features=x.input_features.double(), attention_mask=x.attention_mask)
    else:
        inputs = dict(input_values=torch.from_numpy(wave).double()[None])
    with torch.no_grad(), ablated(original, removed):
        expected = original(**inputs).logits
    with torch.no_grad():
        got, plain = pruned(**inputs).logits, original(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(plain, expected)  # the ablation changed the output: the comparison means something


def test_a_family_the_installed_transformers_lacks_is_refused_naming_the_release(monkeypatch, tmp_path):
    """As on CI's floors run, where transformers 4.56.2 has no Parakeet: a clear error, not an AttributeError."""
    import dataclasses
    import types

    import transformers

    from neurostat.model import families
    from neurostat.model.families import ModelError, family_of

    lacking = dataclasses.replace(families.FAMILIES["parakeet"], classes=("NoSuchEncoder", "NoSuchConfig", "NoSuch"))
    monkeypatch.setitem(families.FAMILIES, "parakeet", lacking)
    message = f"Parakeet / FastConformer needs transformers >= 4.57 .*installed: {transformers.__version__}"
    with pytest.raises(ModelError, match=message):
        family_of(types.SimpleNamespace(model_type="parakeet_encoder"), "m")
    assert lacking.unavailable().startswith("Parakeet / FastConformer needs transformers >= 4.57 (NoSuchEncoder")


@pytest.mark.parametrize("model_type", [_family("wav2vec2-conformer")])
def test_layers_select_both_ffns_of_a_conformer_layer_and_every_tool_names_them(prepared, tmp_path, model_type):
    """``--layers 2`` collects entries 3 and 4 (2.ffn1, 2.ffn2), named in the store's ``ffn`` coordinate, in
    info, select's table, a report, diff and the neuron browser; neuron files key the entries, and ablate
    takes them."""
    model = str(save_model(tmp_path / "m", model_type))
    out = tmp_path / "s.zarr"
    args = ["collect", "--prepared", str(prepared.path), "--model", model, "--out", str(out), "--tokens", "all"]
    res = CliRunner().invoke(main, [*args, "--layers", "2", "--topk-ratio", "0.1", "--top-frames", "2"])
    assert res.exit_code == 0, res.output
    ds = xr.open_zarr(out, consolidated=False)
    assert ds["layer"].values.tolist() == [3, 4] and ds["ffn"].values.tolist() == ["2.ffn1", "2.ffn2"]
    assert ds["topk_count"].coords["ffn"].values.tolist() == ["2.ffn1", "2.ffn2"]  # xarray attaches it
    res = CliRunner().invoke(main, ["info", str(out)])
    assert "3 layers x 2 FFNs x 37 FFN neurons" in res.output and "layers collected: 2.ffn1, 2.ffn2" in res.output
    sel = tmp_path / "sel"
    res = CliRunner().invoke(
        main, ["select", str(out), "--property", "phone-type", "--sigma", "0.5", "--out", str(sel)]
    )
    assert res.exit_code == 0, res.output
    assert "2.ffn1 2.ffn2" in " ".join(res.output.split())
    neurons = json.loads((sel / "phone-type.json").read_text())
    assert set(neurons) == {"3", "4"} and neurons["4"]  # ffn2 has phone-type neurons to ablate
    res = CliRunner().invoke(
        main, ["report", str(out), "--neurons", str(sel / "phone-type.json"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<th>2.ffn1</th><th>2.ffn2</th>" in page and "3 layers × 2 FFNs × 37 neurons" in page
    res = CliRunner().invoke(main, ["diff", str(out), str(out), "--property", "phone-type", "--sigma", "0.5"])
    assert res.exit_code == 0 and "2.ffn1 2.ffn2" in " ".join(res.output.split()), res.output
    site = tmp_path / "b"
    res = CliRunner().invoke(main, ["browse", str(out), "--prepared", str(prepared.path), "--all", "--out", str(site)])
    assert res.exit_code == 0, res.output
    first = sorted((site / "neurons").glob("L4-*.html"))[0].read_text()  # entry 4: layer 2's ffn2
    assert "<h1>Layer 2.ffn2, neuron" in first and "<td>2.ffn1</td>" in (site / "index.html").read_text()
    res = CliRunner().invoke(
        main, ["ablate", "--model", model, "--neurons", str(sel / "phone-type.json"), "--out", str(tmp_path / "ab")]
    )
    assert res.exit_code == 0, res.output
    ffn2 = load_adapter(str(tmp_path / "ab")).ffns[3]  # 2.ffn2: its ablated neurons' W2 columns are zero
    assert (ffn2.down.weight[:, neurons["4"]] == 0).all() and ffn2.name == "2.ffn2"
    res = CliRunner().invoke(main, ["collect", *args[1:-2], "--out", str(tmp_path / "x.zarr"), "--layers", "4"])
    assert res.exit_code != 0 and "has layers 1..3; no layer [4]" in res.output


def test_the_readme_table_lists_every_family_as_the_table_says():
    """One row per family of the table, with its model types, class, input, frames, FFNs and release."""
    from pathlib import Path

    from neurostat.model.families import FAMILIES

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Supported families") :]
    rows = [line for line in section.splitlines() if line.startswith("| ")][2:]
    expected = []
    for f in FAMILIES.values():
        ffns = "1" if len(f.ffns) == 1 else f"{len(f.ffns)}: " + ", ".join(p.name for p in f.ffns)
        types = ", ".join(f"`{t}`" for t in f.model_types)
        expected.append(f"| {f.title} | {types} | `{f.classes[0]}` | {f.input} | {f.frame_ms} | {ffns} | {f.since} |")
    assert rows[: len(expected)] == expected


@pytest.mark.parametrize("model_type", [_family("wav2vec2-bert"), _family("parakeet")])
def test_the_filterbank_families_frames_are_the_models_own(tmp_path, model_type):
    """The frame geometry counts the encoder's frames for lengths around every hop and subsampling step, and
    centres them where the model's frames are: w2v-BERT's at 20 ms · t + 17.5 ms (two stacked 25 ms frames),
    FastConformer's at 80 ms · t; a TextGrid's phone at known times labels the frames whose centre it holds."""
    import transformers

    from neurostat.frames import FrameGeometry, label_frames
    from neurostat.model.loading import load_geometry

    model_dir = str(save_model(tmp_path / "m", model_type))
    geometry = load_geometry(model_dir)
    assert FrameGeometry.from_dict(geometry.to_dict()) == geometry  # as a prepared corpus records it
    fe = transformers.AutoFeatureExtractor.from_pretrained(model_dir)
    model = transformers.AutoModel.from_pretrained(model_dir).eval()
    for n in (400, 559, 560, 719, 720, 1279, 1280, 1281, 1439, 1440, 1441, 4799, 16000, 16161):
        x = fe(np.zeros(n, dtype=np.float32) + 0.01, sampling_rate=16000, return_tensors="pt")
        if model_type == "parakeet":
            with torch.no_grad():
                frames = int(
                    model(input_features=x.input_features, attention_mask=x.attention_mask).attention_mask.sum()
                )
        else:
            frames = int(x.attention_mask.sum())
        assert geometry.num_frames(n) == frames, n
    step, first = (0.08, 0.0) if model_type == "parakeet" else (0.02, 0.0175)
    np.testing.assert_allclose(geometry.centres(5), first + step * np.arange(5), atol=1e-12)
    ids = label_frames(np.array([0.1]), np.array([0.2]), np.array([7]), geometry.centres(5))
    expected = [t for t in range(5) if 0.1 <= first + step * t < 0.2]
    assert np.flatnonzero(ids == 7).tolist() == expected
