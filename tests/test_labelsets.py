"""Label sets attached to a prepared corpus: files, checks, the joint label space, collect and select over them."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
import xarray as xr
from click.testing import CliRunner
from float64_reference import stats_reference
from storefactory import joint, make_store
from transformers import AutoFeatureExtractor, AutoModel

from neurostat.cli import main
from neurostat.corpus.labelsets import LabelSetError, attach_label_set, read_label_file
from neurostat.corpus.prepare import PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus
from neurostat.engine.collect import CollectConfig, collect
from neurostat.engine.merge import merge_stores
from neurostat.frames import default_geometry
from neurostat.labelspace import LabelSpace
from neurostat.model.loading import load_adapter
from neurostat.phones import ARPABET, PHONES
from neurostat.select import GroupSpec, SelectionError, property_neurons
from neurostat.stats import open_stats
from neurostat.store import StoreError

RATIO = 0.1
CLUSTERS = ("a", "b", "c")


@pytest.fixture
def corpus(prepared, tmp_path) -> PreparedCorpus:
    """A private copy of the prepared demo corpus that a test may attach label sets to."""
    shutil.copytree(prepared.path, tmp_path / "prepared")
    return PreparedCorpus(tmp_path / "prepared")


def write_labels(corpus, tmp_path, units=5, seed=0):
    """Random frame-level units and utterance clusters as text files; returns the files and the truth."""
    rng = np.random.default_rng(seed)
    unit = {r["id"]: rng.integers(0, units, r["num_frames"]) for r in corpus.records}
    spk = {r["id"]: CLUSTERS[i % 3] for i, r in enumerate(corpus.records)}
    (tmp_path / "unit.txt").write_text(
        "# k-means units\n" + "".join(f"{u} {' '.join(map(str, v))}\n" for u, v in unit.items())
    )
    (tmp_path / "spk.txt").write_text("".join(f"{u}\t{c}\n" for u, c in spk.items()))
    return tmp_path / "unit.txt", tmp_path / "spk.txt", unit, spk


def attach_both(corpus, tmp_path):
    unit_file, spk_file, unit, spk = write_labels(corpus, tmp_path)
    attach_label_set(corpus, "unit", read_label_file(unit_file, "frame"), "frame", str(unit_file))
    attach_label_set(corpus, "spk", read_label_file(spk_file, "utterance"), "utterance", str(spk_file))
    return unit, spk


def test_label_space_of_any_parts_encodes_row_major():
    space = LabelSpace.of({"phone": ("x", "y", "z"), "gender": ("M", "F"), "pitch_bin": ("lo", "hi"), "unit": "0123"})
    assert space.shape == (3, 2, 2, 4) and space.size == 48
    p, g, b, u = np.array([2, 0, 1]), 1, np.array([0, 1, -1]), np.array([3, 0, 2])
    ids = space.encode({"phone": p, "gender": g, "pitch_bin": b, "unit": u})
    assert ids.tolist() == [((2 * 2 + 1) * 2 + 0) * 4 + 3, ((0 * 2 + 1) * 2 + 1) * 4 + 0, -1]
    names = space.names()
    assert [names[part][ids[0]] for part in space.parts] == ["z", "F", "lo", "3"]
    sub = space.subspace(("unit", "phone"))
    assert sub.parts == ("phone", "unit") and sub.size == 12
    assert LabelSpace.from_dict(space.to_dict()) == space
    for bad in ({"label": "ab"}, {"2x": "ab"}, {"unit": ("a", "a")}, {}):
        with pytest.raises(ValueError):
            LabelSpace.of(bad)
    with pytest.raises(KeyError, match="no label part 'accent'"):
        space.subspace(("accent",))


def test_label_file_errors_name_file_and_line(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("u1 3 4\nu2 1\nu1 2\n")
    with pytest.raises(LabelSetError, match=r"l.txt:3: utterance u1 already has labels on line 1"):
        read_label_file(f, "frame")
    f.write_text("u1 a\nu2 a b\n")
    with pytest.raises(LabelSetError, match=r"l.txt:2: .* 2 labels; an utterance-level file has one"):
        read_label_file(f, "utterance")
    f.write_text("u1\n")
    with pytest.raises(LabelSetError, match=r"l.txt:1: utterance u1 has no labels"):
        read_label_file(f, "frame")
    f.write_text("# nothing\n\n")
    with pytest.raises(LabelSetError, match="no utterances with labels"):
        read_label_file(f, "frame")
    f.write_text("u1 10 9 2\nu2 x\n")
    assert read_label_file(f, "frame")["u1"].dtype.kind == "U"
    f.write_text("u1 10 9 2\n")
    assert read_label_file(f, "frame")["u1"].tolist() == [10, 9, 2]
    with pytest.raises(LabelSetError, match="cannot read"):
        read_label_file(tmp_path / "missing.txt", "frame")


def test_attach_checks_frames_and_coverage(corpus, tmp_path):
    unit_file, spk_file, unit, spk = write_labels(corpus, tmp_path)
    labels = read_label_file(unit_file, "frame")
    first = corpus.records[0]["id"]
    short = {**labels, first: labels[first][:-1]}
    with pytest.raises(LabelSetError, match=rf"utterance {first} has {len(labels[first]) - 1} labels but"):
        attach_label_set(corpus, "unit", short, "frame", "short.txt")
    partial = {u: v for u, v in labels.items() if u != first}
    with pytest.raises(LabelSetError, match=rf"no labels for 1 of the {len(corpus)} utterances .*{first}"):
        attach_label_set(corpus, "unit", partial, "frame", "partial.txt")
    with pytest.raises(LabelSetError, match="none of its 1 utterances"):
        attach_label_set(corpus, "unit", {"nobody": [1]}, "frame", "other.txt")
    for name in ("phone", "gender", "pitch_bin", "pitch", "label", "k-means"):
        with pytest.raises(LabelSetError, match="cannot name a label set"):
            attach_label_set(corpus, name, labels, "frame", "x")
    entry = attach_label_set(
        corpus, "unit", {**partial, "elsewhere": np.array([1])}, "frame", "partial.txt", allow_missing=True
    )
    assert entry["missing"] == 1 and entry["unused"] == 1 and entry["vocab"] == ["0", "1", "2", "3", "4"]
    first_files = sorted(p.name for p in (corpus.path / "labels").iterdir())
    same = attach_label_set(corpus, "unit", {**partial, "elsewhere": np.array([1])}, "frame", "again.txt", True)
    assert sorted(p.name for p in (corpus.path / "labels").iterdir()) == first_files
    assert same["file"] == entry["file"] == f"labels/{first_files[0]}"  # named by content
    changed = {**partial, corpus.records[1]["id"]: partial[corpus.records[1]["id"]][::-1]}
    entry = attach_label_set(corpus, "unit", changed, "frame", "changed.txt", True)
    files = sorted(p.name for p in (corpus.path / "labels").iterdir())
    assert len(files) == 2 and set(files).isdisjoint(first_files) and entry["file"] == f"labels/{files[0]}"
    assert tuple(corpus.vocabularies) == ("phone", "gender", "pitch_bin", "unit")
    reopened = PreparedCorpus(corpus.path)
    utt = reopened[1]
    np.testing.assert_array_equal(utt.part_labels("unit"), changed[utt.id])
    np.testing.assert_array_equal(reopened[2].part_labels("unit"), unit[reopened[2].id])
    with pytest.raises(Exception, match="no 'unit' label") as caught:
        reopened[0].part_labels("unit")
    assert caught.typename == "Skip" and caught.value.reason == "no-unit-label"
    reopened.remove_label_set("unit")
    assert tuple(reopened.vocabularies) == ("phone", "gender", "pitch_bin")
    assert not list((corpus.path / "labels").glob("unit*"))


def test_joint_frames_over_extra_parts(corpus, tmp_path):
    unit, spk = attach_both(corpus, tmp_path)
    space = LabelSpace.of_corpus(corpus)
    names = space.names()
    for utt in corpus:
        ids = space.joint_frames(utt)
        phones, bins = utt.phone_frames(), utt.pitch_bins()
        for t in range(utt.num_frames):
            if phones[t] < 0:
                assert ids[t] == -1
                continue
            assert names["phone"][ids[t]] == PHONES[phones[t]]
            assert names["pitch_bin"][ids[t]] == corpus.meta.pitch.bins[bins[t]]
            assert names["gender"][ids[t]] == utt.gender
            assert names["unit"][ids[t]] == str(unit[utt.id][t]) and names["spk"][ids[t]] == spk[utt.id]


def test_reprepare_keeps_label_sets_and_stale_sets_are_refused(corpus, demo_corpus, tmp_path):
    attach_both(corpus, tmp_path)
    prepare(
        demo_corpus / "LibriSpeech",
        "dev-clean",
        demo_corpus / "alignments",
        corpus.path,
        PrepareSettings(default_geometry()),
        progress=False,
    )
    again = PreparedCorpus(corpus.path)
    assert set(again.label_sets) == {"unit", "spk"}
    # a label set whose frame counts no longer match (e.g. re-prepared for another model) is refused
    manifest = corpus.path / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["num_frames"] += 1
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LabelSetError, match=rf"utterance {rows[0]['id']} has \d+ 'unit' labels but"):
        PreparedCorpus(corpus.path).check_label_sets(("phone", "unit"))


def name_reference(corpus, model_dir, unit, spk, parts):
    """Float64 statistics keyed by label-name tuples over ``parts``, from batch-1 hooked forwards of every
    frame (tokens "all"); labels come from the test's own label dicts, not from the engine."""
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float64).eval()
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    captured = {}
    for i, layer in enumerate(model.encoder.layers):
        layer.feed_forward.intermediate_act_fn.register_forward_hook(
            lambda m, inp, out, i=i: captured.__setitem__(i, out)
        )
    keys, rows = {}, {i: [] for i in range(len(model.encoder.layers))}
    bins = corpus.meta.pitch.bins
    for utt in corpus:
        wave, sr = sf.read(utt.audio_path, dtype="float32")
        x = torch.from_numpy(fe(wave, sampling_rate=sr, return_tensors="np").input_values[0]).double()
        with torch.no_grad():
            model(x[None])
        phones, pitch = utt.phone_frames(), utt.pitch_bins()
        for t in np.flatnonzero(phones >= 0):
            every = {
                "phone": PHONES[phones[t]],
                "gender": utt.gender,
                "pitch_bin": bins[pitch[t]],
                "unit": str(unit[utt.id][t]),
                "spk": spk[utt.id],
            }
            key = keys.setdefault(tuple(every[p] for p in parts), len(keys))
            for layer in rows:
                rows[layer].append((captured[layer][0, t].double().numpy(), key))
    width = model.config.intermediate_size
    return keys, stats_reference(rows, len(keys), width, max(1, round(RATIO * width)))


@pytest.mark.parametrize("parts", [None, ("phone", "unit")])
def test_collect_over_label_sets_matches_hook_reference(corpus, tiny_model, tmp_path, parts):
    unit, spk = attach_both(corpus, tmp_path)
    out = tmp_path / "s.zarr"
    adapter = load_adapter(str(tiny_model), dtype=torch.float64)
    collect(corpus, adapter, out, CollectConfig(topk_ratio=RATIO, tokens="all", labels=parts), progress=False)
    parts = parts or ("phone", "gender", "pitch_bin", "unit", "spk")
    keys, ref = name_reference(corpus, tiny_model, unit, spk, parts)
    ds = xr.open_zarr(out, consolidated=False)
    assert set(ds.coords) == {"layer", "ffn", *parts} and tuple(ds.attrs["labels"]) == parts
    store_label = {tuple(str(ds[p].values[i]) for p in parts): i for i in range(ds.sizes["label"])}
    index = np.array([store_label[key] for key in keys])
    np.testing.assert_array_equal(ds["frames"].values[index], ref["frames"])
    assert ds["frames"].values.sum() == ref["frames"].sum()
    for name in ("topk_count", "positive_count"):
        np.testing.assert_array_equal(ds[name].values[:, index], ref[name], err_msg=name)
    for name in ("mean", "var"):
        np.testing.assert_allclose(ds[name].values[:, index], ref[name], rtol=1e-9, atol=1e-12, err_msg=name)
    stats = open_stats(out)
    assert stats.parts == parts
    marginal = stats.counts("topk", by=("unit",))
    for u in marginal["unit"].values:
        chosen = [i for key, i in keys.items() if key[parts.index("unit")] == u]
        np.testing.assert_array_equal(marginal.sel(unit=u).values, ref["topk_count"][:, chosen].sum(1))


def test_missing_labels_are_recorded_skips(corpus, tiny_model, tmp_path):
    unit_file, _, _, _ = write_labels(corpus, tmp_path)
    labels = read_label_file(unit_file, "frame")
    dropped = corpus.records[0]["id"]
    del labels[dropped]
    attach_label_set(corpus, "unit", labels, "frame", str(unit_file), allow_missing=True)
    attrs = collect(
        corpus,
        load_adapter(str(tiny_model)),
        tmp_path / "s.zarr",
        CollectConfig(topk_ratio=RATIO, labels=("phone", "unit")),
        progress=False,
    )
    assert attrs.progress.skips == {"no-unit-label": 1}
    assert attrs.progress.utterances_done == len(corpus)
    assert attrs.label_sets["unit"]["missing"] == 1


def test_shards_over_label_sets_merge_exactly(corpus, tiny_model, tmp_path):
    attach_both(corpus, tmp_path)
    adapter = load_adapter(str(tiny_model))
    config = lambda **kw: CollectConfig(topk_ratio=RATIO, labels=("phone", "spk", "unit"), **kw)  # noqa: E731
    collect(corpus, adapter, tmp_path / "all.zarr", config(), progress=False)
    for i in range(2):
        collect(corpus, adapter, tmp_path / f"{i}.zarr", config(shard=(i, 2)), progress=False)
    merge_stores([tmp_path / "0.zarr", tmp_path / "1.zarr"], tmp_path / "m.zarr")
    whole, merged = (xr.open_zarr(tmp_path / n, consolidated=False) for n in ("all.zarr", "m.zarr"))
    for name in ("frames", "topk_count", "positive_count"):
        np.testing.assert_array_equal(merged[name].values, whole[name].values)
    np.testing.assert_array_equal(merged["unit"].values, whole["unit"].values)
    assert open_stats(tmp_path / "m.zarr").parts == ("phone", "unit", "spk")


def test_resume_refuses_a_store_counted_on_other_labels(corpus, tiny_model, tmp_path):
    unit_file, _, unit, _ = write_labels(corpus, tmp_path)
    attach_label_set(corpus, "unit", read_label_file(unit_file, "frame"), "frame", str(unit_file))
    adapter = load_adapter(str(tiny_model))
    config = CollectConfig(topk_ratio=RATIO, labels=("phone", "unit"))
    collect(corpus, adapter, tmp_path / "s.zarr", config, progress=False)
    collect(corpus, adapter, tmp_path / "s.zarr", config, resume=True, progress=False)  # same labels: fine
    relabelled = {u: (v + 1) % 5 for u, v in unit.items()}  # same vocabulary, other labels
    attach_label_set(corpus, "unit", relabelled, "frame", "relabelled")
    with pytest.raises(StoreError, match="collected with other settings .*label_sets"):
        collect(corpus, adapter, tmp_path / "s.zarr", config, resume=True, progress=False)


def test_collect_refuses_unknown_parts_and_oversized_spaces(corpus, tiny_model, tmp_path, monkeypatch):
    adapter = load_adapter(str(tiny_model))
    with pytest.raises(ValueError, match="has no label part unit; its parts are phone, gender, pitch_bin"):
        collect(corpus, adapter, tmp_path / "a.zarr", CollectConfig(labels=("phone", "unit")), progress=False)
    monkeypatch.setattr("os.sysconf", lambda name: 64 if name == "SC_AVPHYS_PAGES" else 4096)
    with pytest.raises(ValueError, match=r"328 labels\) needs .* GiB of state .* choose fewer label parts"):
        collect(corpus, adapter, tmp_path / "b.zarr", CollectConfig(), progress=False)


SPK_SPACE = LabelSpace.of({"phone": PHONES, "gender": ("M", "F"), "pitch_bin": ("low",), "unit": "012", "spk": "xy"})


def planted_store(path):
    """Utterance clusters x, y over units 0-2: layer-1 neuron 3 fires for x in every unit, neuron 5 for y
    in units 0 and 1 only; everything else sits at chance."""
    frames = np.zeros(SPK_SPACE.size, np.int64)
    topk = np.zeros((2, SPK_SPACE.size, 8), np.int64)
    for u in "012":
        for s in "xy":
            i = joint("AA", "M", space=SPK_SPACE, unit=u, spk=s)
            frames[i] = 10
            topk[:, i, :] = 2  # P = 0.2 = r, not above chance
            if s == "x":
                topk[0, i, 3] = 9
            elif u != "2":
                topk[0, i, 5] = 9
    sets = {"unit": {"level": "frame"}, "spk": {"level": "utterance"}}
    return make_store(path, frames, topk=topk, k=2, space=SPK_SPACE, label_sets=sets)


def as_dict(neurons) -> dict[int, list[int]]:
    return {n: sorted(neurons[n]) for n in neurons.layers}


def test_select_groups_over_utterance_clusters_and_units(tmp_path):
    stats = open_stats(planted_store(tmp_path / "s.zarr"))
    spec = GroupSpec("spk", {"x": ["x"], "y": ["y"]}, within="unit")
    assert as_dict(property_neurons(stats, groups=spec, sigma=1.0).neurons) == {1: [3], 2: []}
    sel = property_neurons(stats, groups=spec, sigma=0.6)
    assert as_dict(sel.neurons) == {1: [3, 5], 2: []} and sel.settings["within"] == "unit"
    assert sel.property == "spk groups"
    # builtin property of an utterance-level set: its clusters over the phones (AA only has tokens)
    with pytest.warns(UserWarning, match=r"\(group, phone\) cells without tokens count as not above chance"):
        builtin = property_neurons(stats, "spk", sigma=1 / len(ARPABET))
    assert as_dict(builtin.neurons) == {1: [3, 5], 2: []}
    # a frame-level set groups by its own labels: unit 2 has neuron 3 only (through x)
    units = property_neurons(stats, "unit", sigma=1.0)
    assert set(units.groups) == {"0", "1", "2"} and as_dict(units.groups["2"])[1] == [3]
    groups = tmp_path / "g.json"
    groups.write_text(json.dumps({"axis": "spk", "groups": {"x": ["x"], "y": ["y"]}, "within": "unit"}))
    assert as_dict(property_neurons(stats, groups=groups, sigma=1.0).neurons) == {1: [3], 2: []}
    as_yaml = tmp_path / "g.yaml"
    as_yaml.write_text("axis: spk\nwithin: unit\ngroups:\n  x: [x]\n  y: [y]\n")
    assert as_dict(property_neurons(stats, groups=as_yaml, sigma=1.0).neurons) == {1: [3], 2: []}
    as_yaml.write_text("axis: [unclosed\n")
    with pytest.raises(SelectionError, match="g.yaml: not a group file"):
        property_neurons(stats, groups=as_yaml)
    groups.write_text(json.dumps({"axis": "spk", "groups": {"x": ["x"]}, "within": "unit", "cells": ["7"]}))
    with pytest.raises(SelectionError, match=r"cells \['7'\] are not unit labels"):
        property_neurons(stats, groups=groups)
    with pytest.raises(SelectionError, match="has no label part 'accent'"):
        property_neurons(stats, groups=GroupSpec("accent", {"a": ["a"]}))
    with pytest.raises(SelectionError, match="choose from phone-type, gender, pitch, phone, unit, spk"):
        property_neurons(stats, "accent")


def test_cli_select_lists_at_most_16_groups(tmp_path):
    space = LabelSpace.of({"phone": PHONES, "unit": [str(u) for u in range(20)]})
    frames = np.full(space.size, 10, np.int64)
    topk = np.full((1, space.size, 6), 2, np.int64)
    make_store(tmp_path / "s.zarr", frames, topk=topk, space=space, label_sets={"unit": {"level": "frame"}})
    r = CliRunner().invoke(main, ["select", str(tmp_path / "s.zarr"), "--property", "unit"])
    assert r.exit_code == 0, r.output
    assert "N[15]" in r.output and "N[16]" not in r.output and "... and 4 more groups" in r.output


def test_cli_labels_collect_select_info(corpus, tiny_model, tmp_path):
    unit_file, spk_file, _, _ = write_labels(corpus, tmp_path)
    run = CliRunner().invoke
    r = run(main, ["labels", "add", str(corpus.path), "spk", str(spk_file), "--level", "utterance"])
    assert r.exit_code == 0, r.output
    assert "spk: utterance level, 3 labels (a, b, c)" in r.output
    bad = tmp_path / "bad.txt"
    bad.write_text(unit_file.read_text().replace(" 0 ", " 0 0 ", 1))
    r = run(main, ["labels", "add", str(corpus.path), "unit", str(bad)])
    assert r.exit_code == 1 and "model frames" in r.output and "bad.txt" in r.output
    r = run(main, ["labels", "list", str(corpus.path)])
    assert r.exit_code == 0 and r.output.startswith("spk: utterance level")
    out = tmp_path / "s.zarr"
    r = run(
        main,
        ["collect", "--prepared", str(corpus.path), "--model", str(tiny_model), "--out", str(out)]
        + ["--labels", "phone,spk", "--topk-ratio", str(RATIO)],
    )
    assert r.exit_code == 0, r.output
    r = run(main, ["info", str(out)])
    assert r.exit_code == 0 and "41 phone x 3 spk joint labels" in r.output and "tokens per spk: " in r.output
    assert f"label set spk: utterance level, from {spk_file}" in r.output
    r = run(main, ["select", str(out), "--property", "spk", "--property", "phone-type"])
    assert r.exit_code == 0, r.output
    assert "N[a]" in r.output and "overlaps" in r.output
    r = run(main, ["select", str(out), "--property", "gender"])
    assert r.exit_code == 1 and "has no label part 'gender'" in r.output
    r = run(
        main,
        ["collect", "--prepared", str(corpus.path), "--model", str(tiny_model), "--out", str(tmp_path / "x")]
        + ["--labels", "phone,unit"],
    )
    assert r.exit_code == 1 and "has no label part unit" in r.output
    r = run(main, ["labels", "remove", str(corpus.path), "spk"])
    assert r.exit_code == 0 and "no label sets" in run(main, ["labels", "list", str(corpus.path)]).output


def test_a_label_set_cannot_take_a_name_of_the_store():
    """``utterance`` is the store's coordinate of the top frames (collect would overwrite it), ``top`` a dimension."""
    from neurostat.corpus.labelsets import check_name

    for name in ("utterance", "top", "layer", "pitch", "phone"):
        with pytest.raises(LabelSetError):
            check_name(name)
    check_name("unit")
