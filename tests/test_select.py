import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from storefactory import SPACE, joint, make_store

from neurostat.cli import main
from neurostat.neuronset import NeuronSet, NeuronSetError
from neurostat.phones import ARPABET, BROAD_CLASSES
from neurostat.select import GroupSpec, SelectionError, property_neurons, venn
from neurostat.stats import open_stats
from neurostat.store import StoreError

L, D, K = 2, 10, 2  # chance r = k / D = 0.2
N = 10  # tokens per (phone, gender) cell


def base_counts():
    frames = np.zeros(SPACE.size, np.int64)
    topk = np.zeros((L, SPACE.size, D), np.int64)
    for p in ARPABET:
        for g in ("M", "F"):
            frames[joint(p, g)] = N
            topk[:, joint(p, g), :] = 2  # P = 0.2 = r: not above chance (strict)
    return frames, topk


def test_planted_gender_neurons_recovered_exactly(tmp_path):
    frames, topk = base_counts()
    for p in ARPABET:
        topk[0, joint(p, "M"), 3] = 9  # male neuron in layer 1
        topk[1, joint(p, "F"), [5, 7]] = 6  # female neurons in layer 2
        topk[1, joint(p, "M"), 7] = 6  # ... but neuron 7 fires for both: not a property neuron
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, topk, k=K))
    sel = property_neurons(stats, "gender", sigma=0.8)
    assert sel.groups["M"] == NeuronSet({1: [3], 2: [7]})
    assert sel.groups["F"] == NeuronSet({2: [5, 7]})
    assert sel.neurons == NeuronSet({1: [3], 2: [5]})
    assert sel.neurons.counts() == {1: 1, 2: 1}


def test_sigma_boundary_ties_at_chance_and_phone_type(tmp_path):
    frames, topk = base_counts()
    vowels = list(BROAD_CLASSES["vowel"])
    for p in vowels[:12]:  # 12 of 15 vowels above chance: frac = 0.8 exactly
        for g in ("M", "F"):
            topk[0, joint(p, g), 1] = 3
    for p in vowels[:11]:  # 11 of 15: frac = 0.733 < 0.8
        for g in ("M", "F"):
            topk[0, joint(p, g), 2] = 3
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, topk, k=K))
    sel = property_neurons(stats, "phone-type", sigma=0.8)
    assert sel.groups["vowel"][1] == {1}
    assert sel.neurons == NeuronSet({1: [1]})
    assert property_neurons(stats, "phone-type", sigma=0.7).neurons == NeuronSet({1: [1, 2]})
    assert len(property_neurons(stats, "phone-type", sigma=1.0).neurons) == 0
    per_phone = property_neurons(stats, "phone", sigma=1.0)
    assert per_phone.groups[vowels[0]][1] == {1, 2} and len(per_phone.neurons) == 0


def test_empty_cells_warn_and_stay_in_the_denominator(tmp_path):
    frames, topk = base_counts()
    for p in ARPABET:
        topk[0, joint(p, "F"), 4] = 9
    gone = ARPABET[:8]  # 8 of 39 female cells have no tokens: frac = 31/39 = 0.795
    for p in gone:
        frames[joint(p, "F")] = 0
        topk[:, joint(p, "F"), :] = 0
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, topk, k=K))
    with pytest.warns(UserWarning, match=r"cells without tokens count as not above chance .*: group F: 8 of its 39 cells \(IY, IH"):
        sel = property_neurons(stats, "gender", sigma=0.79)
    assert sel.groups["F"][1] == {4} and sel.empty_cells[0] == ("F", "IY")
    with pytest.warns(UserWarning, match=r"group F: only 31 of its 39 cells have tokens, .* at most 0.795 < σ = 0.8"):
        assert len(property_neurons(stats, "gender", sigma=0.8).groups["F"]) == 0
    # --min-tokens leaves the empty cells out of the denominator: 31 of 31
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = property_neurons(stats, "gender", sigma=1.0, min_tokens=1)
    assert sel.groups["F"][1] == {4} and sel.empty_cells == [] and not caught


def test_fragility_warnings_on_tiny_cells_and_none_on_a_balanced_store(tmp_path):
    frames, topk = base_counts()  # N = 10 tokens a cell >= D/k = 5: balanced
    stats = open_stats(make_store(tmp_path / "balanced.zarr", frames, topk, k=K))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for prop in ("gender", "phone-type"):
            property_neurons(stats, prop, sigma=0.8)
    assert not caught, [str(w.message) for w in caught]
    small = ARPABET[:5]
    for p in small:  # 3 tokens, one of them a top-k hit of neuron 6: P = 0.33 > r on evidence of one token
        frames[joint(p, "M")] = 3
        topk[:, joint(p, "M"), :] = 0
        topk[0, joint(p, "M"), 6] = 1
    stats = open_stats(make_store(tmp_path / "tiny.zarr", frames, topk, k=K))
    with pytest.warns(UserWarning, match=r"fewer than D/k = 5 tokens, .*: group M: 5 of its 39 cells \(--min-tokens"):
        sel = property_neurons(stats, "gender", sigma=0.1)
    assert 6 in sel.groups["M"][1]
    sel = property_neurons(stats, "gender", sigma=0.1, min_tokens=5)  # the tiny cells left out
    assert 6 not in sel.groups["M"][1] and sel.settings["min_tokens"] == 5
    res = CliRunner().invoke(main, ["select", str(tmp_path / "tiny.zarr"), "--min-tokens", "5", "--sigma", "0.1"])
    assert res.exit_code == 0 and "fewer than D/k" not in res.output


def test_user_groups_pitch_and_entropy_rule(tmp_path):
    frames = np.zeros(SPACE.size, np.int64)
    topk = np.zeros((L, SPACE.size, D), np.int64)
    for p in ARPABET:
        for b in ("low", "mid", "high"):
            frames[joint(p, "M", b)] = N
            topk[:, joint(p, "M", b), :] = 1
            topk[0, joint(p, "M", b), 6] = 9 if b == "high" else 1
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, topk, k=K))
    assert property_neurons(stats, "pitch").neurons == NeuronSet({1: [6]})
    spec = tmp_path / "groups.json"
    spec.write_text(json.dumps({"axis": "pitch_bin", "groups": {"not-high": ["low", "mid"], "high": ["high"]}}))
    sel = property_neurons(stats, groups=spec)
    assert sel.groups["high"] == NeuronSet({1: [6]}) and len(sel.groups["not-high"]) == 0
    lape = property_neurons(stats, "pitch", rule="entropy", entropy_quantile=0.01, min_prob_quantile=0.9)
    assert lape.neurons == NeuronSet({1: [6]}) and lape.groups["high"] == NeuronSet({1: [6]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"axis": "gender", "groups": {"x": ["Q"]}}))
    with pytest.raises(SelectionError, match="not gender labels"):
        property_neurons(stats, groups=bad)
    with pytest.raises(SelectionError, match="sigma"):
        property_neurons(stats, "pitch", sigma=0)
    with pytest.raises(SelectionError, match="unknown property"):
        GroupSpec.builtin("accent", stats)


def test_store_without_the_statistic(tmp_path):
    frames, topk = base_counts()
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, topk, k=K))
    with pytest.raises(StoreError, match="no 'positive_count'"):
        property_neurons(stats, "gender", stat="positive")


def test_neuronset_algebra_json_and_overlap(tmp_path):
    a = NeuronSet({1: [1, 2, 3], 2: [4]}, num_layers=3, width=10)
    b = NeuronSet({1: [3, 4], 3: [9]}, num_layers=3, width=10)
    assert (a | b) == NeuronSet({1: [1, 2, 3, 4], 2: [4], 3: [9]})
    assert (a & b) == NeuronSet({1: [3]})
    assert (a - b) == NeuronSet({1: [1, 2], 2: [4]})
    assert a.counts() == {1: 3, 2: 1, 3: 0} and len(a) == 4
    assert a.overlap(b)[1] == {"only_self": 2, "both": 1, "only_other": 1}
    assert json.loads(a.to_json()) == {"1": [1, 2, 3], "2": [4], "3": []}
    a.save(tmp_path / "a.json")
    assert NeuronSet.load(tmp_path / "a.json", num_layers=3, width=10) == a
    c = NeuronSet({1: [1, 5], 2: [4]})
    regions = venn({"a": a, "b": b, "c": c})
    assert regions == {"a&c": 2, "a": 1, "a&b": 1, "b": 2, "c": 1}
    assert sum(regions.values()) == len(a | b | c)
    with pytest.raises(NeuronSetError, match="layer 4 does not exist"):
        NeuronSet.from_json('{"4": [1]}', num_layers=3, width=10)
    with pytest.raises(NeuronSetError, match="out of range"):
        NeuronSet.from_json('{"1": [10]}', num_layers=3, width=10)
    with pytest.raises(NeuronSetError, match="different models"):
        a | NeuronSet({1: [1]}, num_layers=12, width=3072)
    with pytest.raises(NeuronSetError, match="not JSON"):
        NeuronSet.from_json("{1: [", where="x.json")


def test_random_like_matches_counts_per_layer_and_avoids_a_set():
    chosen = NeuronSet({1: [0, 1, 2], 2: [5], 3: []}, num_layers=3, width=12)
    avoid = chosen | NeuronSet({1: [3, 4, 5, 6, 7]})
    draws = [chosen.random_like(seed, avoid=avoid) for seed in range(20)]
    for d in draws:
        assert d.counts() == chosen.counts() and not (d & avoid) and d.width == 12
        assert d[1] <= {8, 9, 10, 11}  # only the layer's neurons outside avoid
    assert chosen.random_like(3, avoid=avoid) == draws[3]  # the seed decides
    assert len({d[1] for d in draws}) > 1 and len({d[2] for d in draws}) > 1  # and it draws
    assert set().union(*(d[2] for d in draws)) <= set(range(12)) - {5}
    with pytest.raises(NeuronSetError, match="cannot draw 3 random neurons from the 2"):
        chosen.random_like(0, avoid=NeuronSet({1: range(10)}))
    with pytest.raises(NeuronSetError, match="needs the layer width"):
        NeuronSet({1: [0]}).random_like(0)
    assert NeuronSet({1: [0]}).random_like(0, width=4)[1] <= {0, 1, 2, 3}


def test_cli_select_prints_counts_and_overlaps(tmp_path):
    frames, topk = base_counts()
    for p in ARPABET:
        topk[0, joint(p, "M"), 3] = 9
    store = make_store(tmp_path / "s.zarr", frames, topk, k=K)
    res = CliRunner().invoke(
        main, ["select", str(store), "--property", "gender", "--property", "phone-type", "--out", str(tmp_path / "sel")]
    )
    assert res.exit_code == 0, res.output
    assert "gender" in res.output and "overlaps" in res.output
    assert "N[voiced-consonant]" in res.output and "N[unvoiced-consonant]" in res.output  # names whole
    rows = [line for line in res.output.splitlines() if line.startswith(("layer", "gender", "  N["))]
    assert len({len(line.split("   total")[0]) for line in rows if line.startswith("layer")}) == 1
    assert "gender 1" in res.output and "overlaps (exclusive regions, all layers): \n" not in res.output + "\n"
    assert NeuronSet.load(tmp_path / "sel" / "gender.json") == NeuronSet({1: [3]})
    empty = make_store(tmp_path / "e.zarr", *base_counts(), k=K)
    res = CliRunner().invoke(main, ["select", str(empty), "--property", "gender", "--property", "phone-type"])
    assert "overlaps (exclusive regions, all layers): none: no property has a neuron" in res.output
    res = CliRunner().invoke(main, ["select", str(store), "--stat", "positive"])
    assert res.exit_code == 1 and "no 'positive_count'" in res.output


def test_min_tokens_is_recorded_and_warns_when_it_leaves_a_group_few_cells(tmp_path):
    """With --min-tokens a group may shrink to the cells it keeps: say so, in the header and beside the file."""
    frames, topk = base_counts()
    for g in ("M", "F"):
        frames[joint("AH", g)] = 100
        topk[:, joint("AH", g), :] = 30  # P = 0.3 > r for every neuron on AH, 0.2 (not above) elsewhere
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, topk, k=K))
    with pytest.warns(UserWarning, match=r"group M: --min-tokens 50 keeps 1 of its 39 cells \(AH\)"):
        sel = property_neurons(stats, "gender", sigma=0.8, min_tokens=50)
    assert len(sel.groups["M"]) == L * D  # every neuron is a "group neuron" on the evidence of AH alone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        property_neurons(stats, "gender", sigma=0.8, min_tokens=5)  # every cell kept: nothing to say
    assert not [w for w in caught if "keeps" in str(w.message)]
    res = CliRunner().invoke(
        main, ["select", str(tmp_path / "s.zarr"), "--min-tokens", "50", "--out", str(tmp_path / "g.json")]
    )
    assert res.exit_code == 0, res.output
    assert "min tokens 50 (cells with fewer left out" in res.output and "keeps 1 of its 39 cells" in res.output
    NeuronSet.load(tmp_path / "g.json", L, D)  # the neuron file keeps the paper's format
    settings = json.loads((tmp_path / "g.settings.json").read_text())
    assert settings["min_tokens"] == 50 and settings["sigma"] == 0.8 and settings["property"] == "gender"
    res = CliRunner().invoke(main, ["select", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "all")])
    assert res.exit_code == 0 and "min tokens" not in res.output
    assert json.loads((tmp_path / "all" / "gender.settings.json").read_text())["min_tokens"] == 0


def test_the_papers_rule_on_positive_counts_warns_that_its_chance_level_is_top_ks(tmp_path):
    """P(a > 0 | cell) is about 0.5, far above r = k/D: the paper's rule then reports most neurons (issue 42)."""
    import warnings

    frames, topk = base_counts()
    stats = open_stats(make_store(tmp_path / "s.zarr", frames, None, topk * 0 + frames.max() // 2, k=K))
    with pytest.warns(UserWarning, match=r"top-k chance level r = k/D = .* made for --stat topk .* --rule entropy"):
        property_neurons(stats, "gender", stat="positive")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        property_neurons(stats, "gender", stat="positive", rule="entropy")
