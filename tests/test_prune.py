import json

import pytest
import torch
from click.testing import CliRunner
from rounding import FORWARD_BOUND, forward_path, unit_roundoff
from transformers import HubertForCTC

import neurostat
from neurostat.cli import main
from neurostat.model.checkpoints import PruneError
from neurostat.model.edit import ablated, zero_neurons
from neurostat.model.factory import model_config, save_model
from neurostat.model.loading import load_adapter, load_pruned
from neurostat.model.pruning import count_parameters, neuron_scores, plan, prune, save_pruned
from neurostat.neuronset import NeuronSet, NeuronSetError

LAYERS, WIDTH, HIDDEN = 3, 37, 32


def tiny_ctc(seed=0):
    torch.manual_seed(seed)
    cfg = model_config(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=WIDTH, vocab_size=11)
    return HubertForCTC(cfg).eval()


def wave(seed=1):
    return torch.randn(1, 8000, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).logits


def test_mask_equals_zeroed_columns_equals_physical_pruning():
    model, x = tiny_ctc(), wave()
    gone = NeuronSet({1: [0, 5, 36], 2: [], 3: list(range(0, WIDTH, 3))})
    with ablated(model, gone):
        masked = logits(model, x)
    assert not torch.equal(masked, logits(model, x))  # the hooks are gone after the block
    zeroed = logits(zero_neurons(tiny_ctc(), gone), x)
    keep = {layer: [j for j in range(WIDTH) if j not in gone[layer]] for layer in range(1, LAYERS + 1)}
    pruned_model = tiny_ctc()
    result = prune(
        pruned_model, keep={layer: len(v) for layer, v in keep.items()}, protect=NeuronSet(keep), criterion="l1"
    )
    assert result.kept == keep
    pruned = logits(pruned_model, x)
    assert (masked - zeroed).abs().max().item() == 0
    assert (masked - pruned).abs().max().item() == 0


def test_scores_budgets_and_protection():
    model = tiny_ctc()
    ffn = neurostat.model.loading.model_ffns(model)[0]
    scores = neuron_scores(model, "l1")
    manual = ffn.up.weight.abs().sum(1) + ffn.up.bias.abs() + ffn.down.weight.abs().sum(0)
    torch.testing.assert_close(scores[1], manual.double())
    low = int(torch.argmin(scores[1]))
    kept = plan(scores, ratio=0.5, protect=NeuronSet({1: [low]}))
    assert low in kept[1] and all(len(v) == round(0.5 * WIDTH) for v in kept.values())
    unprotected = plan(scores, ratio=0.5)
    assert low not in unprotected[1]
    assert set(unprotected[2]) == set(torch.argsort(scores[2], descending=True)[:18].tolist())
    assert plan(scores, exact_protected=True, protect=NeuronSet({2: [4, 1]})) == {1: [], 2: [1, 4], 3: []}
    glob = plan(scores, ratio=0.3, scope="global")
    assert sum(len(v) for v in glob.values()) == round(0.3 * 3 * WIDTH)
    with pytest.raises(PruneError, match="3 protected neurons but a budget of 2"):
        plan(scores, keep=2, protect=NeuronSet({1: [1, 2, 3]}))
    with pytest.raises(PruneError, match="exactly one budget"):
        plan(scores)
    with pytest.raises(PruneError, match="cannot keep 40 of 37"):
        plan(scores, keep=40)
    with pytest.raises(NeuronSetError, match="layer 7 does not exist"):
        plan(scores, keep=5, protect=NeuronSet({7: [1]}))


def test_save_load_roundtrip_and_parameter_drop(tmp_path):
    model, x = tiny_ctc(), wave()
    before = count_parameters(model)
    result = prune(model, ratio=0.4, criterion="l2")
    removed = sum(WIDTH - len(v) for v in result.kept.values())
    assert result.params_before == before
    assert before - result.params_after == removed * (2 * HIDDEN + 1)  # a W1 row, a b1 entry, a W2 column
    out = save_pruned(model, result, tmp_path / "pruned", "tiny", protected={"none": NeuronSet()})
    back = load_pruned(out)
    assert type(back) is HubertForCTC
    assert torch.equal(logits(back, x), logits(model, x))
    assert [f.width for f in neurostat.model.loading.model_ffns(back)] == [len(v) for v in result.kept.values()]
    with pytest.raises(PruneError, match="not a neurostat pruned checkpoint"):
        load_pruned(tmp_path)
    import json

    record = json.loads((out / "neurostat.json").read_text())
    assert record["edit"] == "pruned" and record["kept"] == {str(k): v for k, v in result.kept.items()}
    del record["edit"]  # written before ablate wrote records too: a record without an edit is a pruned one
    (out / "neurostat.json").write_text(json.dumps(record))
    assert torch.equal(logits(load_pruned(out), x), logits(model, x))
    (out / "neurostat.json").write_text(json.dumps({**record, "edit": "melted"}))
    with pytest.raises(Exception, match="not a neurostat checkpoint record"):
        load_pruned(out)


def test_ablate_rejects_neurons_the_model_does_not_have():
    with pytest.raises(NeuronSetError, match="out of range"):
        with ablated(tiny_ctc(), NeuronSet({1: [WIDTH]})):
            pass
    with pytest.raises(NeuronSetError, match="layer 4 does not exist"):
        zero_neurons(tiny_ctc(), NeuronSet({4: [0]}))


@pytest.mark.fp32
def test_cli_ablate_and_prune(tmp_path):
    model_dir = save_model(tmp_path / "m", intermediate_size=WIDTH, num_hidden_layers=LAYERS)
    sel = tmp_path / "sel.json"
    NeuronSet({1: [1, 2], 3: [0]}).save(sel)
    runner = CliRunner()
    res = runner.invoke(
        main, ["ablate", "--model", str(model_dir), "--neurons", str(sel), "--out", str(tmp_path / "ab")]
    )
    assert res.exit_code == 0, res.output
    edited = neurostat.model.loading.load_full_model(str(tmp_path / "ab"))
    w2 = neurostat.model.loading.model_ffns(edited)[0].down.weight
    assert w2[:, [1, 2]].abs().sum() == 0 and w2[:, 0].abs().sum() > 0
    res = runner.invoke(
        main,
        [
            "prune",
            "--model",
            str(model_dir),
            "--protect",
            str(sel),
            "--keep-ratio",
            "0.25",
            "--out",
            str(tmp_path / "pr"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "parameters:" in res.output and "FFN widths per layer: 1:9 2:9 3:9" in res.output
    pruned = load_pruned(tmp_path / "pr")
    assert (tmp_path / "pr" / "preprocessor_config.json").is_file()
    assert [f.width for f in neurostat.model.loading.model_ffns(pruned)] == [9, 9, 9]
    adapters = {d: load_adapter(str(tmp_path / d)) for d in ("pr", "ab")}  # pruned, and a plain HF folder
    assert adapters["pr"].width == 9 and adapters["ab"].width == WIDTH
    x = wave()
    hidden, _ = adapters["pr"].encode([x[0]])
    with torch.no_grad():
        own = pruned(x).last_hidden_state[0]
    rtol = 2 * forward_path(pruned.config, len(own))[-1] * unit_roundoff(torch.float32)
    assert (hidden[0] - own).abs().max() <= rtol * own.abs().max(), FORWARD_BOUND
    res = runner.invoke(
        main, ["prune", "--model", str(model_dir), "--protect", str(sel), "--keep", "1", "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 1 and "2 protected neurons but a budget of 1" in res.output
    big = tmp_path / "big.json"
    big.write_text('{"13": [3071]}')
    res = runner.invoke(
        main, ["ablate", "--model", str(model_dir), "--neurons", str(big), "--out", str(tmp_path / "y")]
    )
    assert res.exit_code == 1 and "layer 13 does not exist" in res.output


def test_the_library_takes_demo_for_the_shipped_model(tmp_path):
    """``demo`` names the shipped demo model in the library's loading, not only through the CLI."""
    from neurostat.model.checkpoints import DEMO_MODEL_DIR
    from neurostat.model.loading import load_adapter, load_geometry, load_pruned
    from neurostat.model.pruning import prune_checkpoint

    assert load_adapter("demo").source == str(DEMO_MODEL_DIR)
    assert load_geometry("demo") == load_adapter(str(DEMO_MODEL_DIR)).geometry
    result = prune_checkpoint("demo", tmp_path / "pruned", ratio=0.5)
    assert sum(result.widths().values()) < sum(f.width for f in load_adapter("demo").ffns)
    load_pruned(tmp_path / "pruned")


def test_edited_checkpoints_get_default_file_modes_and_model_folders_no_digest(tmp_path, monkeypatch):
    """model.safetensors was 0600 beside 0644 files; the weight digest went into the model's own folder."""
    from neurostat.model.checkpoints import weights_digest_file, weights_fingerprint
    from neurostat.model.edit import ablate_checkpoint
    from neurostat.model.pruning import prune_checkpoint

    monkeypatch.setenv("NEUROSTAT_CACHE", str(tmp_path / "cache"))
    model = save_model(tmp_path / "m", intermediate_size=WIDTH, num_hidden_layers=LAYERS)
    NeuronSet({1: [1]}).save(tmp_path / "n.json")
    ablate_checkpoint(str(model), tmp_path / "n.json", tmp_path / "ab")
    prune_checkpoint(str(model), tmp_path / "pr", ratio=0.5)
    for out in (tmp_path / "ab", tmp_path / "pr"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert modes["model.safetensors"] == modes["config.json"] and modes["config.json"] & 0o044, modes
    before = sorted(p.name for p in model.iterdir())
    digest = weights_fingerprint(str(model))
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written into the model's folder
    cached = weights_digest_file(model)
    assert cached.parent == tmp_path / "cache" / "weights" and json.loads(cached.read_text())["sha1"] == digest
    assert weights_fingerprint(str(model)) == digest
