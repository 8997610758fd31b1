"""A neuron file's indices belong to the model it was selected on: its settings record that model, and
prune, ablate, report and browse refuse to apply it to another one unless told to (issue 41, item 3)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from storefactory import SPACE, make_store

from neurostat.cli import main
from neurostat.engine.collect import CollectConfig, collect
from neurostat.model.loading import load_adapter
from neurostat.model.factory import save_model
from neurostat.neuronset import NeuronModel, NeuronSet, NeuronSetError


def select(store, out):
    result = CliRunner().invoke(main, ["select", str(store), "--property", "gender", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out / "gender.json"


@pytest.fixture(scope="module")
def selections(prepared, tiny_model, tmp_path_factory):
    """Gender neurons selected on the tiny model, on a twin of the same geometry with other weights, and
    on a hand-made 2 x 96 store (a small Whisper's geometry)."""
    root = tmp_path_factory.mktemp("neuron-files")
    twin = save_model(root / "twin", seed=1)
    files = {}
    for name, model in (("tiny", tiny_model), ("twin", twin)):
        store = root / f"{name}.zarr"
        config = CollectConfig(tokens="all", stats=("topk", "top_frames"), top_frames=2)
        collect(prepared, load_adapter(str(model)), store, config, progress=False)
        files[name] = select(store, root / f"{name}-sel")
    counts = np.ones((2, SPACE.size, 96), np.int64)
    files["2x96"] = select(make_store(root / "small.zarr", np.full(SPACE.size, 5, np.int64), counts), root / "small")
    return twin, files


def test_select_records_the_model_beside_each_file(selections, tiny_model):
    _, files = selections
    recorded = NeuronModel.recorded_for(files["tiny"])
    assert (recorded.num_layers, recorded.width, recorded.source) == (3, 37, str(tiny_model))
    assert recorded.weights == load_adapter(str(tiny_model)).weights
    assert json.loads(files["tiny"].with_suffix(".settings.json").read_text())["model"] == recorded.to_dict()


def test_prune_and_ablate_refuse_a_file_of_another_model(selections, tiny_model, tmp_path):
    twin, files = selections
    run = CliRunner().invoke
    for command, option in (("prune", "--protect"), ("ablate", "--neurons")):
        base = [command, "--model", str(tiny_model), "--out", str(tmp_path / command)]
        base += ["--keep-ratio", "0.5"] if command == "prune" else []
        for other, why in (("twin", "other weights"), ("2x96", "another geometry")):
            result = run(main, [*base, option, str(files[other])])
            assert result.exit_code == 1 and why in result.output and "--allow-other-model" in result.output
            assert not (tmp_path / command).exists()
        result = run(main, [*base, option, str(files["twin"]), "--allow-other-model"])
        assert result.exit_code == 0, result.output
        result = run(main, [*base, option, str(files["tiny"]), "--overwrite"])  # its own model: accepted
        assert result.exit_code == 0, result.output
    result = run(main, ["prune", "--model", str(twin), "--keep-ratio", "0.5", "--protect", str(files["twin"]),
                        "--out", str(tmp_path / "twin-pruned")])  # fmt: skip
    assert result.exit_code == 0, result.output


def test_report_and_browse_refuse_a_file_of_another_model(selections, tmp_path):
    _, files = selections
    store = files["tiny"].parent.parent / "tiny.zarr"
    run = CliRunner().invoke
    result = run(main, ["report", str(store), "--neurons", str(files["twin"]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "other weights" in result.output, result.output
    args = ["report", str(store), "--neurons", str(files["twin"]), "--allow-other-model", "--out", str(tmp_path / "r")]
    assert run(main, args).exit_code == 0
    result = run(main, ["browse", str(store), "--neurons", str(files["2x96"]), "--out", str(tmp_path / "b")])
    assert result.exit_code == 1 and "another geometry" in result.output, result.output


def test_a_file_without_settings_is_checked_against_the_geometry_only(tmp_path):
    NeuronSet({1: [5]}).save(tmp_path / "hand.json")
    model = NeuronModel("m", 2, 8)
    assert NeuronSet.load(tmp_path / "hand.json", model=model)[1] == {5}
    with pytest.raises(NeuronSetError, match="out of range 0..3"):
        NeuronSet.load(tmp_path / "hand.json", model=NeuronModel("m", 2, 4))
