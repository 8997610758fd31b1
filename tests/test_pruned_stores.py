"""Pruned checkpoints are first-class (issue 41, item 5): collect reads them like any model, the store records
each kept neuron's index in the original model, and diff compares the kept neurons by that index."""

import json

import numpy as np
import xarray as xr
from click.testing import CliRunner
from rounding import assert_within, forward_delta, forward_path, layer_scale, moment_tolerances, unit_roundoff
from transformers import AutoConfig

from neurostat.cli import main
from neurostat.model.factory import save_model
from neurostat.model.provenance import EditRecord

ARGS = ["--tokens", "all", "--topk-ratio", "0.1", "--dtype", "float64"]
ARGS += ["--stat", "topk", "--stat", "positive", "--stat", "moments", "--stat", "max_abs"]


def test_collect_a_pruned_checkpoint_and_diff_it_with_its_original_by_original_index(prepared, tmp_path):
    model = str(save_model(tmp_path / "m"))
    res = CliRunner().invoke(main, ["prune", "--model", model, "--keep-ratio", "0.5", "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    kept = {int(e): v for e, v in EditRecord.read(tmp_path / "p").neurons.items()}
    assert all(len(v) == 18 for v in kept.values()) and kept[1] != list(range(18))
    stores = {}
    for name, source in (("original", model), ("pruned", str(tmp_path / "p"))):
        stores[name] = tmp_path / f"{name}.zarr"
        cmd = ["collect", "--prepared", str(prepared.path), "--model", source, "--out", str(stores[name]), *ARGS]
        res = CliRunner().invoke(main, cmd)
        assert res.exit_code == 0, res.output
    a, b = (xr.open_zarr(stores[n], consolidated=False) for n in ("original", "pruned"))
    assert "original_neuron" not in a.coords and b.sizes["neuron"] == 18
    assert b["original_neuron"].dims == ("layer", "neuron")
    assert b["original_neuron"].values.tolist() == [kept[e] for e in (1, 2, 3)]
    assert b.attrs["model"]["pruned_from"] == model
    # the first layer sees the same input in both models: its kept neurons' activations are the original's, up to
    # the rounding of an up-projection of another width (float64: the forward bound, and no sign that flips)
    first = kept[1]
    np.testing.assert_array_equal(b["positive_count"].values[0], a["positive_count"].values[0][:, first])
    longest = max(len(utt.phone_frames()) for utt in prepared)
    u, scale = unit_roundoff(np.float64), layer_scale(a["max_abs"].values[:1])
    delta = forward_delta(forward_path(AutoConfig.from_pretrained(model), longest)[:1], scale, u)
    frames = a["frames"].values
    tolerance = moment_tolerances(delta, scale, frames.max(), frames, u)["mean"][0]
    assert_within(b["mean"].values[0], a["mean"].values[0][:, first], tolerance, "layer 1 mean")
    res = CliRunner().invoke(main, ["info", str(stores["pruned"])])
    assert res.exit_code == 0 and "3 layers x 18 FFN neurons" in res.output, res.output
    out = tmp_path / "diff"
    res = CliRunner().invoke(
        main, ["diff", str(stores["original"]), str(stores["pruned"]), "--by", "gender", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "neurons compared" in res.output and "by their index in the original model" in res.output
    assert 'data-kind="compared"' in (out / "index.html").read_text()
    d = json.loads((out / "diff.json").read_text())
    assert d["compared"] == {"1": 18, "2": 18, "3": 18}
    assert d["tested"] == 3 * 18 * 2  # every (layer, gender, kept neuron)
    assert d["top"], (d["significant"], d["tested"], res.output)
    for cell in d["top"]:  # each cell names the neuron by its original index, with its counts in each store
        layer, j = cell["layer"], cell["neuron"]
        assert j in kept[layer]
        rows = b["gender"].values == cell["label"]["gender"]  # the joint labels of the cell's gender
        assert cell["count_a"] == int(a["topk_count"].values[layer - 1][rows, j].sum())
        assert cell["count_b"] == int(b["topk_count"].values[layer - 1][rows, kept[layer].index(j)].sum())
    for change in d["properties"].values():
        for per in (change["gained"], change["lost"]):
            assert all(set(v) <= set(kept[int(layer)]) for layer, v in per.items())


def test_a_pruned_checkpoint_of_unequal_widths_collects_a_width_at_a_time(prepared, tmp_path):
    model = str(save_model(tmp_path / "m"))
    args = ["prune", "--model", model, "--keep-ratio", "0.5", "--scope", "global", "--out", str(tmp_path / "p")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    widths = EditRecord.read(tmp_path / "p").widths
    assert len(set(widths.values())) > 1, widths
    cmd = ["collect", "--prepared", str(prepared.path), "--model", str(tmp_path / "p"), "--out", str(tmp_path / "s")]
    res = CliRunner().invoke(main, [*cmd, *ARGS])
    assert res.exit_code == 1 and "the FFNs have different widths" in res.output
    assert "collect the layers of one width at a time with --layers" in res.output
    res = CliRunner().invoke(main, [*cmd, *ARGS, "--layers", "2"])
    assert res.exit_code == 0, res.output
    ds = xr.open_zarr(tmp_path / "s", consolidated=False)
    assert ds.sizes["neuron"] == widths["2"] and ds["layer"].values.tolist() == [2]
