"""Every command that writes a folder writes only into a new or empty folder or over its own kind of output,
never into a folder that is, holds or lies inside one of its inputs (issue 31, item 1)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from storefactory import SPACE, make_store

from neurostat.cli import main
from neurostat.errors import UserError
from neurostat.files import check_out_folder
from neurostat.model.factory import save_model
from neurostat.neuronset import NeuronSet

THESIS = "thesis.tex"


def thesis(folder):
    """An ordinary folder of the user's: one file that must survive every refusal."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / THESIS).write_text("chapter 1")
    return folder


def refused(result, *words):
    assert result.exit_code == 1, result.output
    for word in words:
        assert word in result.output, result.output


def small_store(path):
    frames = np.full(SPACE.size, 10, np.int64)
    return make_store(path, frames, np.full((2, SPACE.size, 8), 1, np.int64))


def test_check_out_folder_rules(tmp_path):
    def never(_folder):
        return False

    assert check_out_folder(tmp_path / "new", "thing", never) == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_out_folder(tmp_path / "empty", "thing", never)
    with pytest.raises(UserError, match=f"holds other files \\(e.g. {THESIS}\\) and is not a thing"):
        check_out_folder(thesis(tmp_path / "mine"), "thing", never)
    check_out_folder(tmp_path / "mine", "thing", lambda f: (f / THESIS).is_file())
    src = tmp_path / "a" / "src"
    src.mkdir(parents=True)
    for out, relation in ((src, "is"), (tmp_path / "a", "contains"), (src / "x", "lies inside")):
        with pytest.raises(UserError, match=f"{relation} the input {src}"):
            check_out_folder(out, "thing", lambda f: True, [src, None, "hub/id"])
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError, match="is a file"):
        check_out_folder(tmp_path / "f", "thing", lambda f: True)


@pytest.fixture
def model_and_neurons(tmp_path):
    model = save_model(tmp_path / "nest" / "m", intermediate_size=16, num_hidden_layers=2)
    (tmp_path / "nest" / "sibling.txt").write_text("keep me")
    neurons = tmp_path / "n.json"
    NeuronSet({1: [0]}).save(neurons)
    return model, neurons


def _intact(model):
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert (model.parent / "sibling.txt").read_text() == "keep me"


def test_ablate_never_replaces_the_folder_of_its_source_or_a_user_folder(tmp_path, model_and_neurons):
    model, neurons = model_and_neurons
    run = CliRunner().invoke
    base = ["ablate", "--model", str(model), "--neurons", str(neurons), "--overwrite", "--out"]
    refused(run(main, [*base, str(model.parent)]), "contains the input", str(model), "choose a folder outside it")
    refused(run(main, [*base, str(model / "inner")]), "lies inside the input")
    refused(run(main, [*base, str(thesis(tmp_path / "docs"))]), "is not a checkpoint")
    _intact(model)
    assert (tmp_path / "docs" / THESIS).is_file()
    assert run(main, [*base, str(tmp_path / "ab")]).exit_code == 0
    assert run(main, [*base, str(tmp_path / "ab")]).exit_code == 0  # its own checkpoint: replaced


def test_prune_never_replaces_the_folder_of_its_source_or_a_user_folder(tmp_path, model_and_neurons):
    model, neurons = model_and_neurons
    run = CliRunner().invoke
    base = ["prune", "--model", str(model), "--keep-ratio", "0.5", "--overwrite", "--out"]
    refused(run(main, [*base, str(model.parent)]), "contains the input", str(model))
    refused(run(main, [*base, str(thesis(tmp_path / "nest2"))]), "is not a checkpoint", THESIS)
    refused(run(main, [*base, str(tmp_path), "--protect", str(neurons)]), "contains the input")
    _intact(model)
    assert (tmp_path / "nest2" / THESIS).is_file()
    assert run(main, [*base, str(tmp_path / "pr")]).exit_code == 0
    assert run(main, [*base, str(tmp_path / "pr")]).exit_code == 0


def test_merge_never_writes_over_its_inputs_and_does_not_advise_resume(tmp_path):
    a, b = small_store(tmp_path / "a.zarr"), small_store(tmp_path / "b.zarr")
    run = CliRunner().invoke
    refused(run(main, ["merge", str(a), str(b), "--out", str(a), "--overwrite"]), "is the input")
    refused(run(main, ["merge", str(a), str(b), "--out", str(tmp_path), "--overwrite"]), "contains the input")
    refused(
        run(main, ["merge", str(a), str(b), "--out", str(thesis(tmp_path / "t")), "--overwrite"]),
        "not a neurostat store",
    )
    c = small_store(tmp_path / "c.zarr")
    result = run(main, ["merge", str(a), str(b), "--out", str(c)])
    refused(result, "already exists; pass --overwrite")
    assert "--resume" not in result.output
    assert (tmp_path / "t" / THESIS).is_file()


def test_report_writes_only_a_new_or_empty_folder_or_a_report(tmp_path, monkeypatch):
    store = small_store(tmp_path / "s.zarr")
    run = CliRunner().invoke
    refused(run(main, ["report", str(store), "--out", str(thesis(tmp_path / "docs"))]), "is not a report")
    refused(run(main, ["report", str(store), "--out", str(store / "pictures")]), "lies inside the input")
    assert (tmp_path / "docs" / THESIS).is_file()
    from neurostat.report import TITLE, is_report

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "index.html").write_text(f"<html><head>{TITLE}: s.zarr</title>")
    assert is_report(tmp_path / "old") and not is_report(tmp_path / "docs")


def test_browse_writes_only_a_new_or_empty_folder_or_a_browser(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    (tmp_path / "prepared").mkdir()
    run = CliRunner().invoke
    base = ["browse", str(store), "--prepared", str(tmp_path / "prepared"), "--out"]
    refused(run(main, [*base, str(thesis(tmp_path / "docs"))]), "is not a neuron browser")
    refused(run(main, [*base, str(tmp_path / "prepared" / "site")]), "lies inside the input")
    assert (tmp_path / "docs" / THESIS).is_file()


def test_select_out_folder_is_new_empty_or_neuron_files(tmp_path):
    store = small_store(tmp_path / "s.zarr")
    run = CliRunner().invoke
    refused(run(main, ["select", str(store), "--out", str(thesis(tmp_path / "docs"))]), "not a folder of neuron files")
    refused(run(main, ["select", str(store), "--out", str(store)]), "is the input")
    assert run(main, ["select", str(store), "--out", str(tmp_path / "sel")]).exit_code == 0
    assert run(main, ["select", str(store), "--out", str(tmp_path / "sel")]).exit_code == 0  # its own: rewritten
    assert (tmp_path / "docs" / THESIS).is_file()


def test_prepare_out_is_new_empty_or_a_prepared_corpus(tmp_path):
    (tmp_path / "LibriSpeech" / "dev-clean").mkdir(parents=True)
    (tmp_path / "align").mkdir()
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "phones.json").write_text(json.dumps({}))
    run = CliRunner().invoke
    base = ["prepare", "--root", str(tmp_path), "--subset", "dev-clean", "--out"]
    for labels in (["--alignments", str(tmp_path / "align")], ["--paper-labels", str(tmp_path / "paper")]):
        refused(run(main, [*base, str(thesis(tmp_path / "docs")), *labels]), "is not a prepared corpus")
        refused(run(main, [*base, str(tmp_path / labels[1].split("/")[-1] / "p"), *labels]), "lies inside the input")
    assert (tmp_path / "docs" / THESIS).is_file()


def hub_cache(hub, model, repo_id="org/tiny", commit="0123456789abcdef0123456789abcdef01234567"):
    """``model``'s files laid out as the HF cache keeps a download of ``repo_id``: blobs named by content,
    a snapshot of links into them, refs/main naming the snapshot."""
    import hashlib

    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(model.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/{blob.name}")
    return repo, snapshot


def test_a_hub_id_is_protected_in_every_cache_it_may_load_from(tmp_path, monkeypatch):
    """transformers < 5 loads a hub id from its own TRANSFORMERS_CACHE, fixed at import, which may differ
    from the hub client's cache: the id's folder in both is the model's."""
    import huggingface_hub
    from transformers.utils import hub as transformers_hub

    from neurostat.model.outputs import source_paths

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(tmp_path / "transformers"), raising=False)
    folder = "models--org--tiny"
    assert source_paths("org/tiny") == [tmp_path / "hub" / folder, tmp_path / "transformers" / folder]
    monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(tmp_path / "hub"))
    assert source_paths("org/tiny") == [tmp_path / "hub" / folder]


def test_a_hub_models_cache_folder_is_never_written(tmp_path, monkeypatch, model_and_neurons):
    """`--model <hub id>` protects the id's folder in the HF cache (snapshot and blobs) as a local source folder
    is protected, and a local snapshot folder protects the blobs its links point into (issue 41, item 2)."""
    import huggingface_hub
    from transformers.utils import hub as transformers_hub

    model, neurons = model_and_neurons
    repo, snapshot = hub_cache(tmp_path / "hub", model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    if hasattr(transformers_hub, "TRANSFORMERS_CACHE"):  # transformers < 5 reads its own copy (the CI floors)
        monkeypatch.setattr(transformers_hub, "TRANSFORMERS_CACHE", str(tmp_path / "hub"))
    blobs = {f: f.read_bytes() for f in (repo / "blobs").iterdir()}
    run = CliRunner().invoke
    for command in (["prune", "--keep-ratio", "0.5"], ["ablate", "--neurons", str(neurons)]):
        for source, out in (("org/tiny", snapshot), ("org/tiny", repo / "blobs"), (str(snapshot), repo / "blobs")):
            refused(run(main, [*command, "--model", source, "--overwrite", "--out", str(out)]), "the input")
        refused(run(main, [*command, "--model", "org/tiny", "--out", str(tmp_path / "hub")]), "contains the input")
        result = run(main, [*command, "--model", "org/tiny", "--out", str(tmp_path / command[0])])
        assert result.exit_code == 0, result.output  # the cache is a real one: the hub id loads from it
    assert {f: f.read_bytes() for f in (repo / "blobs").iterdir()} == blobs
    assert all(link.is_symlink() and link.resolve().parent == repo / "blobs" for link in snapshot.iterdir())


def test_overwrite_replaces_a_checkpoint_only_when_its_folder_holds_nothing_else(tmp_path, model_and_neurons):
    model, neurons = model_and_neurons
    run = CliRunner().invoke
    for command in (["prune", "--keep-ratio", "0.5"], ["ablate", "--neurons", str(neurons)]):
        out = tmp_path / command[0]
        base = [*command, "--model", str(model), "--overwrite", "--out", str(out)]
        assert run(main, base).exit_code == 0
        (out / "train.log").write_text("epoch 1")
        (out / "runs").mkdir()
        refused(run(main, base), "holds runs and 1 more beside a checkpoint", "move them away")
        assert (out / "train.log").read_text() == "epoch 1" and (out / "runs").is_dir()
        (out / "train.log").unlink()
        (out / "runs").rmdir()
        assert run(main, base).exit_code == 0  # nothing but the checkpoint: replaced


def test_an_out_that_links_to_a_folder_gets_the_checkpoint_and_stays_a_link(tmp_path, model_and_neurons):
    model, _ = model_and_neurons
    (tmp_path / "disk" / "target").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "disk" / "target")
    base = ["prune", "--model", str(model), "--keep-ratio", "0.5", "--out", str(tmp_path / "link")]
    for args in (base, [*base, "--overwrite"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert (tmp_path / "link").is_symlink() and (tmp_path / "disk" / "target" / "model.safetensors").is_file()
        assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["target"]  # no temporary folder left
    assert not any(p.name.startswith(".link") for p in tmp_path.iterdir())
