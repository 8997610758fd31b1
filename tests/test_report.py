"""`neurostat report`: the files, PNGs that decode, the page's numbers equal to the selector's, bad input."""

import re

import matplotlib.image
import numpy as np
import pytest
from click.testing import CliRunner

from neurostat.cli import main
from neurostat.engine.collect import CollectConfig, collect
from neurostat.model.loading import load_adapter
from neurostat.report import ReportError, build_report
from neurostat.select import select_properties, venn
from neurostat.stats import open_stats


@pytest.fixture(scope="module")
def store(prepared, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "s.zarr"
    collect(prepared, load_adapter(str(tiny_model)), out, CollectConfig(topk_ratio=0.1), progress=False)
    return out


def page_numbers(text: str) -> tuple[dict, dict]:
    counts = {}
    for prop, layer, n in re.findall(r'<td data-property="([^"]+)" data-layer="(\w+)">(\d+)</td>', text):
        counts.setdefault(prop, {})[layer] = int(n)
    regions = {
        key.replace("&amp;", "&"): int(n) for key, n in re.findall(r'<td data-region="([^"]+)">(\d+)</td>', text)
    }
    return counts, regions


def test_report_from_the_store_shows_the_selectors_numbers(store, tmp_path):
    res = CliRunner().invoke(main, ["report", str(store), "--sigma", "0.5", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    stats = open_stats(store)
    selections, _ = select_properties(stats, ("phone-type", "gender", "pitch"), sigma=0.5)
    pngs = sorted(p.name for p in (tmp_path / "r").glob("*.png"))
    assert {"neurons_per_layer.png", "overlaps.png", "probability_histograms.png"} <= set(pngs)
    for png in pngs:
        image = matplotlib.image.imread(tmp_path / "r" / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    text = (tmp_path / "r" / "index.html").read_text()
    counts, regions = page_numbers(text)
    assert set(counts) == set(selections)
    for name, sel in selections.items():
        per_layer = sel.neurons.counts()
        assert {int(k): v for k, v in counts[name].items() if k != "total"} == {
            n: per_layer.get(n, 0) for n in stats.layers
        }
        assert counts[name]["total"] == len(sel.neurons)
    assert regions == venn({n: s.neurons for n, s in selections.items()})
    assert text.count("data:image/png;base64,") == len(pngs)  # self-contained


def test_report_of_neuron_files_and_bad_input(store, prepared, tiny_model, tmp_path):
    (tmp_path / "mine.json").write_text('{"1": [0, 3, 5], "3": [2]}')
    summary = build_report(store, tmp_path / "r", [tmp_path / "mine.json"])
    assert summary["counts"] == {"mine": {1: 3, 2: 0, 3: 1}} and summary["regions"] == {}
    (tmp_path / "other.json").write_text('{"1": [4000]}')
    with pytest.raises(ReportError, match="3 layers x 37 neurons"):
        build_report(store, tmp_path / "r2", [tmp_path / "other.json"])
    positive = tmp_path / "positive.zarr"
    collect(prepared, load_adapter(str(tiny_model)), positive, CollectConfig(stats=("positive",)), progress=False)
    res = CliRunner().invoke(main, ["report", str(positive), "--out", str(tmp_path / "r3")])
    assert res.exit_code == 1 and "no topk statistic" in res.output and "--stat topk" in res.output


def test_report_with_probe_results_draws_ablation_bars_and_pruning_curves(store, tmp_path):
    from test_probe import synthetic

    from neurostat.probe import run_probes, save_results

    data = synthetic(True, layers=2, hidden=12, speakers=6)
    runs = [("original", {}), ("ablated", {"neurons": "gender"})]
    runs += [("ablated", {"neurons": "random", "seed": s}) for s in range(2)]
    runs += [("pruned", {"method": m, "keep": k}) for m in ("protected", "l1") for k in (0.5, 0.3)]
    runs += [("pruned", {"method": "l1", "keep": k, "probes": "fixed"}) for k in (0.5, 0.3)]
    results = []
    for i, (edit, tag) in enumerate(runs):
        r = run_probes(data, ("gender", "log-f0"), seed=i)
        results.append({"model": "m", "tag": {"edit": edit, **tag}, **r})
    save_results(results, tmp_path / "probes.json")
    args = ["report", str(store), "--probe", str(tmp_path / "probes.json"), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    for png in ("probe_ablation.png", "probe_pruning.png"):
        assert matplotlib.image.imread(tmp_path / "r" / png).shape[0] > 100
    text = (tmp_path / "r" / "index.html").read_text()
    shown = {
        (int(i), t): float(v) for i, t, v in re.findall(r'data-probe="(\d+)" data-task="([^"]+)">([\d.-]+)<', text)
    }
    for i, r in enumerate(results):
        assert shown[(i, "gender")] == pytest.approx(r["tasks"]["gender"]["accuracy"], abs=5e-4)
        assert shown[(i, "log-f0")] == pytest.approx(r["tasks"]["log-f0"]["r2"], abs=5e-4)
    (tmp_path / "bad.json").write_text("[1, 2]")
    res = CliRunner().invoke(
        main, ["report", str(store), "--probe", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x")]
    )
    assert res.exit_code == 1 and "not a neurostat probe results file" in res.output


def test_report_pools_probe_splits_and_random_seeds_and_refuses_to_mix_kinds_of_split(store, tmp_path):
    """Results of several probe splits (bench/claims_bench.py's tags): one kind of split is chosen with
    --probe-where, and every bar and pruning point is the mean ± s.d. of the results that differ only in a
    seed, as a plain loop over the file computes them."""
    from neurostat.probe import FORMAT, save_results
    from neurostat.report import ablation_bars, probe_results, pruning_curves

    rng = np.random.default_rng(7)
    runs = [("original", {}), ("ablated", {"neurons": "vowel"})]
    runs += [("ablated", {"neurons": "random like vowel", "seed": s}) for s in range(3)]
    runs += [("pruned", {"method": m, "keep": k}) for m in ("protected", "l1") for k in (0.5, 0.19, 0.3)]
    runs += [("pruned", {"method": "random-protected", "keep": k, "seed": s}) for k in (0.5, 0.19, 0.3) for s in (0, 1)]
    results = []
    for split, seeds in (("speaker", (0, 1, 2)), ("voice", (0, 3))):
        for split_seed in seeds:
            for edit, tag in runs:
                tasks = {"phone": {"accuracy": float(rng.random()), "accuracy_by_type": {"vowel": float(rng.random())}}}
                tag = {"edit": edit, **tag, "view": "layer-4", "split": split, "split_seed": split_seed}
                results.append({"format": FORMAT, "model": "m", "tag": tag, "tasks": tasks})
    save_results(results, tmp_path / "probes.json")

    args = ["report", str(store), "--probe", str(tmp_path / "probes.json"), "--out", str(tmp_path / "r")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "2 splits (speaker, voice)" in res.output and "--probe-where split=" in res.output
    res = CliRunner().invoke(main, [*args[:-2], "--probe-where", "split=none", "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "no result has split=none" in res.output and "split=voice" in res.output
    res = CliRunner().invoke(main, [*args[:-2], "--probe-where", "split=speaker", "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert {"probe_ablation.png", "probe_pruning.png"} <= {p.name for p in (tmp_path / "r").glob("*.png")}

    chosen = probe_results(tmp_path / "probes.json", {"split": "speaker"})
    assert len(chosen) == 3 * len(runs) and all(r["tag"]["split"] == "speaker" for r in chosen)

    def pooled(edit, key, value, read):
        values = [read(r) for r in chosen if r["tag"]["edit"] == edit and r["tag"].get(key) == value]
        return np.mean(values), np.std(values, ddof=1), len(values)

    accuracy = lambda r: r["tasks"]["phone"]["accuracy"]  # noqa: E731
    vowel = lambda r: r["tasks"]["phone"]["accuracy_by_type"]["vowel"]  # noqa: E731
    panels = {title: {b.name: (b.mean, b.sd, b.n) for b in bars} for title, _, bars in ablation_bars(chosen)}
    assert set(panels) == {"phone", "phone: vowel"}
    for title, read in (("phone", accuracy), ("phone: vowel", vowel)):
        assert panels[title]["original"] == pytest.approx(pooled("original", "edit", "original", read))
        assert panels[title]["vowel"] == pytest.approx(pooled("ablated", "neurons", "vowel", read))
        random = pooled("ablated", "neurons", "random like vowel", read)
        assert random[2] == 9 and panels[title]["random like vowel"] == pytest.approx(random)
    methods, original = pruning_curves(chosen)["phone"]
    assert (original.mean, original.sd, original.n) == pytest.approx(pooled("original", "edit", "original", accuracy))
    for method, pooled_runs in (("protected", 3), ("l1", 3), ("random-protected", 3 * 2)):  # a control: seeds × splits
        assert [k for k, _ in methods[method]] == [0.19, 0.3, 0.5]
        for keep, bar in methods[method]:
            values = [accuracy(r) for r in chosen if r["tag"].get("method") == method and r["tag"].get("keep") == keep]
            assert (bar.mean, bar.sd, bar.n) == pytest.approx((np.mean(values), np.std(values, ddof=1), pooled_runs))

    # results that differ in more than a seed are never pooled; an empty file draws nothing
    other = [dict(r, tag={**r["tag"], "neurons": "vowel", "count": 5}) for r in chosen if r["tag"]["edit"] == "ablated"]
    with pytest.raises(ReportError, match="'vowel' differ in count, not only in a seed"):
        ablation_bars(chosen + [other[0]])
    with pytest.raises(ReportError, match="differ in layer"):
        pruning_curves(chosen + [dict(r, layer=2) for r in chosen if r["tag"]["edit"] == "pruned"][:1])
    save_results([], tmp_path / "empty.json")
    assert probe_results(tmp_path / "empty.json") == [] and ablation_bars([]) == [] and pruning_curves([]) == {}
    res = CliRunner().invoke(main, ["report", str(store), "--probe-where", "split=voice", "--out", str(tmp_path / "q")])
    assert res.exit_code == 2 and "none was given" in res.output


def test_probe_compare_of_edited_checkpoints_feeds_the_reports_figures(store, prepared, tiny_model, tmp_path):
    """`neurostat probe --compare` of checkpoints from `prune` and `ablate`: their records tag the results,
    so `report --probe` draws the ablation bars and the pruning curve; results without edits get a note."""
    import json

    (tmp_path / "some.json").write_text(json.dumps({"1": [0, 1], "2": [3]}))
    run = CliRunner()
    for args in (
        ["ablate", "--model", str(tiny_model), "--neurons", str(tmp_path / "some.json"), "--out", str(tmp_path / "a")],
        ["prune", "--model", str(tiny_model), "--keep-ratio", "0.5", "--out", str(tmp_path / "p")],
    ):
        res = run.invoke(main, args)
        assert res.exit_code == 0, res.output
    probe = ["probe", "--model", str(tiny_model), "--prepared", str(prepared.path), "--task", "phone-type"]
    compared = [*probe, "--compare", str(tmp_path / "a"), "--compare", str(tmp_path / "p")]
    res = run.invoke(main, [*compared, "--out", str(tmp_path / "probes.json")])
    assert res.exit_code == 0, res.output
    tags = [r["tag"] for r in json.loads((tmp_path / "probes.json").read_text())]
    assert tags[0] == {"edit": "original"} and tags[1] == {"edit": "ablated", "neurons": "some"}
    assert tags[2]["edit"] == "pruned" and tags[2]["keep"] == 0.5  # as asked: 18 of 37 neurons a layer kept
    assert "pruned l1 0.5 " in res.output  # the table's column header (it read 0.4865, issue 42)
    res = run.invoke(
        main, ["report", str(store), "--probe", str(tmp_path / "probes.json"), "--out", str(tmp_path / "r")]
    )
    assert res.exit_code == 0, res.output
    assert {"probe_ablation.png", "probe_pruning.png"} <= {p.name for p in (tmp_path / "r").glob("*.png")}
    res = run.invoke(main, [*probe, "--out", str(tmp_path / "plain.json")])
    res = run.invoke(
        main, ["report", str(store), "--probe", str(tmp_path / "plain.json"), "--out", str(tmp_path / "q")]
    )
    assert res.exit_code == 0 and "no ablated or pruned model among its results" in res.output
