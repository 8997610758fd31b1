"""Linear probes: perfect on separable features, chance on random ones, speaker-disjoint, clear errors."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.errors import OptionError
from neurostat.phones import BROAD_CLASSES, PHONES
from neurostat.probe import (
    LinearProbe,
    ProbeData,
    ProbeError,
    _frames,
    edit_distance,
    layers_first,
    load_results,
    phone_error_rate,
    probe_model,
    run_probes,
    speaker_groups,
    speaker_split,
)

BINS = ("low", "mid", "high", "unvoiced")


def synthetic(separable: bool, seed: int = 0, speakers: int = 10, layers: int = 3, hidden: int = 24) -> ProbeData:
    """Utterances with random labels; ``separable``: layer 2 encodes them linearly, else pure noise."""
    rng = np.random.default_rng(seed)
    ids, spk, gen, feats, phones, f0s, bins = [], [], [], [], [], [], []
    centres = rng.normal(size=(len(PHONES), hidden)) * 3
    centres[:, :6] = 0  # dims 0-2 carry F0, pitch bin and gender
    for t, members in enumerate(BROAD_CLASSES.values()):  # and one direction per phone type
        centres[[PHONES.index(p) for p in members], 3 + t] += 12
    for s in range(speakers):
        gender = "MF"[s % 2]
        for u in range(4):
            n = int(rng.integers(40, 70))
            phone = np.repeat(rng.integers(0, len(PHONES), n // 5 + 1), 5)[:n]
            phone[rng.random(n) < 0.05] = -1
            f0 = np.exp(rng.uniform(np.log(80), np.log(300), n))
            f0[rng.random(n) < 0.3] = np.nan
            binned = np.where(np.isnan(f0), 3, np.digitize(f0, [120, 200]))
            x = rng.normal(size=(n, layers, hidden)).astype(np.float32)
            if separable:
                x[:, 1] += centres[np.maximum(phone, 0)] * (phone >= 0)[:, None]
                x[:, 1, 0] += np.where(np.isnan(f0), 0, 20 * np.log(np.nan_to_num(f0, nan=1)))
                x[:, 1, 1] += 8 * binned
                x[:, 1, 2] += 8.0 if gender == "F" else -8.0
            ids.append(f"{s}-{u}")
            spk.append(str(s))
            gen.append(gender)
            feats.append(torch.from_numpy(x))
            phones.append(phone)
            f0s.append(f0)
            bins.append(binned)
    return ProbeData("synthetic", ids, spk, gen, feats, list(range(1, layers + 1)), phones, PHONES, f0s, bins, BINS)


def test_separable_features_are_probed_near_perfectly():
    r = run_probes(synthetic(True), seed=1)["tasks"]
    assert r["phone"]["accuracy"] > 0.97 and r["phone"]["per"] < 0.1
    assert r["phone-type"]["accuracy"] > 0.97
    assert r["gender"]["accuracy"] == 1.0
    assert r["pitch-bin"]["accuracy"] > 0.97
    assert r["log-f0"]["r2"] > 0.95
    weights = r["phone"]["layer_weights"]
    assert weights[1] == max(weights) and abs(sum(weights) - 1) < 1e-3  # the learnt sum finds layer 2


def test_random_features_give_chance():
    r = run_probes(synthetic(False), seed=1)["tasks"]
    for task in ("phone", "phone-type", "pitch-bin"):
        assert r[task]["accuracy"] < r[task]["majority"] + 0.08, task
        assert r[task]["balanced_accuracy"] < r[task]["balanced_chance"] + 0.08, task
    assert r["log-f0"]["r2"] < 0.05


def test_one_layer_probe_reads_that_layer_only():
    data = synthetic(True)
    good = run_probes(data, ("phone",), layer=2)["tasks"]["phone"]
    noise = run_probes(data, ("phone",), layer=3)["tasks"]["phone"]
    assert good["layer_weights"] == [1.0] and good["accuracy"] > 0.97
    assert noise["accuracy"] < noise["majority"] + 0.08


def test_split_is_speaker_disjoint_and_covers_both_genders():
    data = synthetic(True, speakers=11)
    train, test = speaker_split(data.speakers, data.genders, 0.3, seed=4)
    assert not train & test and train | test == set(data.speakers)
    gender = dict(zip(data.speakers, data.genders))
    assert {gender[s] for s in test} == {"M", "F"} and {gender[s] for s in train} == {"M", "F"}
    ex = _frames(data, [p >= 0 for p in data.phones], data.phones, test, np.int64)
    assert {data.speakers[i] for i in np.unique(ex.utterance)} <= test
    other = speaker_split(data.speakers, data.genders, 0.3, seed=5)
    assert other != (train, test)  # the seed decides the split
    result = run_probes(data, ("gender",), seed=4)
    assert set(result["split"]["test_speakers"]) == test


def voiced(seed: int = 0, speakers: int = 16) -> tuple[ProbeData, dict[str, str]]:
    """Noise features where gender shows only through each voice's own direction (2 voices per gender):
    a probe can learn the voices it saw, not gender itself."""
    data = synthetic(False, seed=seed, speakers=speakers)
    voice = {s: f"{g}{int(s) // 2 % 2}" for s, g in zip(data.speakers, data.genders)}
    for f, s in zip(data.features, data.speakers):
        f[:, :, 4:8] = 0.0
        f[:, :, 4 + "M0 M1 F0 F1".split().index(voice[s])] = 6.0
    return data, voice


def test_group_split_holds_out_whole_voices():
    data, voice = voiced()
    train, test = speaker_split(data.speakers, data.genders, 0.3, seed=1, groups=voice)
    assert not train & test and train | test == set(data.speakers)
    assert not {voice[s] for s in train} & {voice[s] for s in test}
    assert sorted(voice[s][0] for s in test) == ["F"] * 4 + ["M"] * 4  # one voice of each gender, all its speakers
    splits = {frozenset(speaker_split(data.speakers, data.genders, 0.3, seed, voice)[1]) for seed in range(8)}
    assert len(splits) > 1  # the seed picks the voices
    by_speaker = run_probes(data, ("gender",), seed=1)
    by_voice = run_probes(data, ("gender",), seed=1, groups=voice)
    assert by_speaker["split"]["by"] == "speaker" and by_voice["split"]["by"] == "group"
    assert by_voice["split"]["test_groups"] == sorted({voice[s] for s in test})
    assert by_speaker["tasks"]["gender"]["accuracy"] == 1.0  # test speakers' voices were seen in training
    assert by_voice["tasks"]["gender"]["accuracy"] < 0.8  # unseen voices: the voice shortcut fails


def test_group_split_errors_name_the_problem():
    data, voice = voiced()
    with pytest.raises(ProbeError, match="have no group"):
        speaker_split(data.speakers, data.genders, 0.3, 0, {s: v for s, v in voice.items() if s != "3"})
    with pytest.raises(ProbeError, match="group 'M0' has speakers of both genders"):
        speaker_split(data.speakers, data.genders, 0.3, 0, {**voice, "1": "M0"})
    with pytest.raises(ProbeError, match="no gender has 2 groups"):
        speaker_split(data.speakers, data.genders, 0.3, 0, {s: g for s, g in zip(data.speakers, data.genders)})


def test_errors_name_the_problem():
    data = synthetic(True)
    data.phones = [np.full_like(p, -1) for p in data.phones]
    with pytest.raises(ProbeError, match="no frame has a phone label"):
        run_probes(data, ("phone",))
    data = synthetic(True)
    data.pitch_bins = [np.where(b == 2, 1, b) for b in data.pitch_bins]  # nothing in "high"
    with pytest.raises(ProbeError, match="pitch-bin probe: class 'high' has no examples"):
        run_probes(data, ("pitch-bin",))
    data = synthetic(True)
    data.genders = ["M"] * len(data.genders)
    with pytest.raises(ProbeError, match="one gender only"):
        run_probes(data, ("gender",))
    data = synthetic(True)
    vowels = [PHONES.index(p) for p in BROAD_CLASSES["vowel"]]
    data.phones = [np.where(np.isin(p, vowels), PHONES.index("B"), p) for p in data.phones]
    with pytest.raises(ProbeError, match="phone-type probe: class 'vowel' has no examples"):
        run_probes(data, ("phone-type",))
    with pytest.raises(ProbeError, match="at least 2 speakers"):
        speaker_split(["a", "a"], ["M", "M"], 0.3, 0)


def test_fixed_probes_read_another_models_features():
    data = synthetic(True, speakers=16)
    fitted = {}
    own = run_probes(data, ("gender", "log-f0"), seed=2, fitted=fitted)
    assert set(fitted) == {"gender", "log-f0"}
    again = run_probes(data, ("gender", "log-f0"), seed=2, fitted=fitted)  # same features, same probes
    assert again["tasks"]["log-f0"]["r2"] == pytest.approx(own["tasks"]["log-f0"]["r2"])
    assert again["tasks"]["gender"]["probe"] == "fitted on another model"
    moved = synthetic(True, speakers=16)
    for f in moved.features:
        f[:, 1, 2] *= -1  # the gender direction flips: a fixed probe gets it all wrong, a refitted one does not
    assert run_probes(moved, ("gender",), seed=2, fitted=fitted)["tasks"]["gender"]["accuracy"] == 0.0
    assert run_probes(moved, ("gender",), seed=2)["tasks"]["gender"]["accuracy"] == 1.0
    with pytest.raises(OptionError, match="no fitted probe"):
        run_probes(data, ("phone",), fitted=fitted)


def test_phone_error_rate_collapses_repeats_and_drops_silence():
    assert edit_distance([1, 2, 3], [1, 3]) == 1 and edit_distance([], [4, 5]) == 2
    ref = np.array([9, 1, 1, 2, 2, 9, 3])
    pred = np.array([1, 1, 1, 2, 9, 9, 4])
    utt = np.zeros(7, dtype=int)
    assert phone_error_rate(pred, ref, utt, drop={9}) == pytest.approx(1 / 3)  # 1 2 4 vs 1 2 3


def test_probe_cli_compares_models_and_writes_json(prepared, tiny_model, tmp_path):
    out = tmp_path / "probe.json"
    args = ["probe", "--model", str(tiny_model), "--prepared", str(prepared.path), "--compare", str(tiny_model)]
    res = CliRunner().invoke(main, [*args, "--task", "gender", "--task", "phone", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(+0.000)" in res.output and "phone per" in res.output
    results = load_results(out)
    assert [r["model"] for r in results] == [str(tiny_model)] * 2
    assert results[0]["tasks"] == results[1]["tasks"]  # same seed, same model: same numbers
    assert not set(results[0]["split"]["train_speakers"]) & set(results[0]["split"]["test_speakers"])
    direct = probe_model(str(tiny_model), prepared, ("gender", "phone"), progress=False)
    assert direct["tasks"] == results[0]["tasks"]
    res = CliRunner().invoke(main, [*args, "--task", "gender", "--fixed-probes", "--out", str(out)])
    assert res.exit_code == 0, res.output
    own, fixed = load_results(out)
    assert fixed["tag"]["probes"] == "fixed" and fixed["tasks"]["gender"]["probe"] == "fitted on another model"
    assert fixed["tasks"]["gender"]["accuracy"] == own["tasks"]["gender"]["accuracy"]
    (tmp_path / "bad.json").write_text(json.dumps({"not": "results"}))
    with pytest.raises(ProbeError, match="not a neurostat probe results file"):
        load_results(tmp_path / "bad.json")


def test_probe_stops_before_keeping_features_that_do_not_fit(prepared, tiny_model, monkeypatch):
    import os

    from neurostat.model.loading import load_adapter
    from neurostat.probe import extract

    adapter = load_adapter(str(tiny_model))
    monkeypatch.setattr(os, "sysconf", lambda name: 256)  # a 64 KiB machine
    with pytest.raises(ProbeError, match=r"keeps .* GiB of features in memory .* probe one layer"):
        extract(adapter, prepared)


def test_baselines_are_the_test_sets_own_and_balanced():
    """The majority baseline is the test set's largest class share (not the training majority's share
    among test frames), and balanced accuracy weighs every test class alike."""
    from neurostat.probe import _classification

    y = torch.tensor([0] * 6 + [1] * 3 + [2])
    train_y = torch.tensor([2] * 10 + [0])  # the training majority (2) is rare in the test set
    always_two = _classification(torch.full_like(y, 2), y, train_y)
    assert always_two["majority"] == 0.6 and always_two["accuracy"] == pytest.approx(0.1)
    assert always_two["balanced_accuracy"] == pytest.approx(1 / 3) and always_two["balanced_chance"] == 1 / 3
    perfect = _classification(y.clone(), y, train_y)
    assert perfect["accuracy"] == 1.0 and perfect["balanced_accuracy"] == 1.0


def test_table_shows_the_baseline_and_explains_a_per_above_one():
    from neurostat.probe import table

    task = {"accuracy": 0.3, "majority": 0.47, "balanced_accuracy": 0.25, "balanced_chance": 0.2, "per": 1.4}
    text = table([{"model": "m", "tasks": {"phone": task}}])
    assert "majority class" in text and "0.470" in text and "0.200" in text
    assert "above 1 when" in text
    assert "above 1 when" not in table([{"model": "m", "tasks": {"phone": {**task, "per": 0.4}}}])


def test_groups_come_from_the_synthetic_voices_or_a_file(prepared, tmp_path):
    from types import SimpleNamespace

    from neurostat.corpus.synth import speaker_voices

    voices = speaker_groups(prepared, "voices")
    assert voices == speaker_voices(prepared.meta.root) and len(set(voices.values())) > 1
    with pytest.raises(ProbeError, match="needs a corpus made by `neurostat synth`"):
        speaker_groups(SimpleNamespace(meta=SimpleNamespace(root=str(tmp_path))), "voices")
    path = tmp_path / "groups.txt"
    path.write_text("# speaker group\n1000 a\n\n1037 b  # a comment\n")
    assert speaker_groups(prepared, path) == {"1000": "a", "1037": "b"}
    path.write_text("1000 a\n1037\n")
    with pytest.raises(ProbeError, match=r"groups.txt:2: expected `speaker group`"):
        speaker_groups(prepared, path)
    with pytest.raises(ProbeError, match="no such groups file"):
        speaker_groups(prepared, tmp_path / "missing.txt")


def test_probe_cli_holds_out_the_groups_it_is_given(prepared, tiny_model, tmp_path):
    from neurostat.corpus.synth import speaker_voices

    speakers = sorted(speaker_voices(prepared.meta.root))
    own = tmp_path / "own.txt"
    own.write_text("".join(f"{s} {s}\n" for s in speakers))
    args = ["probe", "--model", str(tiny_model), "--prepared", str(prepared.path), "--task", "gender"]
    res = CliRunner().invoke(main, [*args, "--groups", str(own), "--out", str(tmp_path / "own.json")])
    assert res.exit_code == 0, res.output
    by_group = load_results(tmp_path / "own.json")[0]
    default = probe_model(str(tiny_model), prepared, ("gender",), progress=False)
    assert by_group["tasks"] == default["tasks"]  # one group per speaker: the speaker split itself
    assert by_group["split"]["test_groups"] == default["split"]["test_speakers"]
    res = CliRunner().invoke(main, [*args, "--groups", str(tmp_path / "none.txt")])
    assert res.exit_code != 0 and "no such groups file" in res.output


def test_a_split_that_cannot_measure_a_task_says_so():
    """Held-out groups of one gender only (every male speaker in one voice group): the gender test set has
    one class and log F0 of one gender hardly varies; the results and the table say so (issue 41, item 3)."""
    from neurostat.probe import table

    data = synthetic(True, speakers=8)
    groups = {s: ("male voice" if g == "M" else f"voice {s}") for s, g in zip(data.speakers, data.genders)}
    _, test = speaker_split(data.speakers, data.genders, 0.3, 0, groups)
    assert {g for s, g in zip(data.speakers, data.genders) if s in test} == {"F"}
    for f0, speaker in zip(data.f0, data.speakers):
        if speaker in test:
            f0[np.isfinite(f0)] = 250.0 * np.exp(np.random.default_rng(0).normal(0, 0.01, np.isfinite(f0).sum()))
    result = run_probes(data, ("gender", "log-f0", "phone-type"), groups=groups)
    assert "one gender class only ('F')" in result["tasks"]["gender"]["warning"]
    assert "R² compares with the test set's own mean" in result["tasks"]["log-f0"]["warning"]
    assert "warning" not in result["tasks"]["phone-type"]
    text = table([{**result, "model": "m"}])
    assert "note: gender: the test speakers hold one gender class only" in text and "note: log-f0:" in text
    assert "warning" not in run_probes(data, ("gender",))["tasks"]["gender"]  # speakers of both genders held out


@pytest.mark.parametrize("layers", [1, 5])
def test_the_probes_weighted_sum_is_the_sum_over_layers(layers):
    """The probe reads its features layers first (one matrix-vector product); what it computes is still
    Σ_l softmax(w)_l · x[:, l, :] followed by the linear map, here in float64 on odd shapes."""
    gen = torch.Generator().manual_seed(layers)
    x = torch.randn(37, layers, 13, generator=gen, dtype=torch.float64)
    probe = LinearProbe(layers, 13, 7, weighted=layers > 1).double()
    with torch.no_grad():
        probe.layer_logits.copy_(torch.randn(layers, generator=gen))
        probe.linear.weight.copy_(torch.randn(7, 13, generator=gen))
        probe.linear.bias.copy_(torch.randn(7, generator=gen))
    w = torch.softmax(probe.layer_logits.detach(), 0)
    weight, bias = probe.linear.weight.detach(), probe.linear.bias.detach()
    expected = sum(w[i] * x[:, i, :] for i in range(layers)) @ weight.T + bias
    torch.testing.assert_close(probe(layers_first(x)), expected, rtol=0, atol=1e-12)
