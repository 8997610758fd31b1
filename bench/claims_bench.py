"""The paper's two claims, measured offline on the shipped demo model (neurostat.tiny).

    python bench/claims_bench.py                   # ~18 min on 2 cores; writes bench/claims/weighted/ (JSON + tables)
    python bench/claims_bench.py --layer last      # probes read the top layer: bench/claims/layer-4/
    python bench/claims_bench.py --smoke           # a tiny run of every step (CI)

1. Property neurons (phone-type, gender, pitch; the paper's rule, sigma 0.8) per layer, in the trained
   model and in its random-init twin.
2. Ablation: removing the gender neurons vs as many random neurons (same layers, 5 seeds): the gender
   probe's drop, and the phone probe's as a control; removing each phone type's neurons: the phone
   accuracy of each type (the paper's table layout).
3. Pruning: keeping each layer's property neurons plus the highest-L1 rest ("protected") vs plain L1
   pruning at equal width (50 %, 30 %, 19 % kept), probes of each, no retraining.

Neurons are selected on one synthetic corpus and probed on another (other speakers); both speak with
voices the model never heard in training.  Probe results carry tags ({"edit", "method", "keep", ...})
so `neurostat report STORE --probe bench/claims/layer-4/probes.json` can plot them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurostat.corpus.prepare import PrepareSettings, prepare  # noqa: E402
from neurostat.corpus.prepared import PreparedCorpus  # noqa: E402
from neurostat.corpus.synth import synthesize  # noqa: E402
from neurostat.demo import demo_model  # noqa: E402
from neurostat.engine.collect import CollectConfig, collect  # noqa: E402
from neurostat.model.adapter import ModelAdapter, load_geometry  # noqa: E402
from neurostat.model.edit import ablated  # noqa: E402
from neurostat.model.pruning import PruneError, prune  # noqa: E402
from neurostat.neuronset import NeuronSet  # noqa: E402
from neurostat.probe import extract, headline, run_probes, save_results  # noqa: E402
from neurostat.select import select_properties  # noqa: E402
from neurostat.stats import open_stats  # noqa: E402
from neurostat.tiny.train import TrainSettings, save_random_twin  # noqa: E402

PROPERTIES = ("phone-type", "gender", "pitch")


def corpus(work: Path, name: str, speakers: int, utterances: int, seed: int, first: int, model: str) -> PreparedCorpus:
    """A synthetic corpus of unseen voices, prepared for ``model``'s frame geometry (built once)."""
    raw, out = work / f"{name}-raw", work / name
    if not (out / "meta.json").is_file():
        synthesize(raw, "dev-clean", speakers, utterances, seed=seed, progress=False, first_speaker=first)
        prepare(
            raw / "LibriSpeech", "dev-clean", raw / "alignments", out,
            PrepareSettings(load_geometry(model)), progress=False,
        )  # fmt: skip
    return PreparedCorpus(out)


def select(adapter: ModelAdapter, selection_corpus: PreparedCorpus, store: Path) -> dict:
    """Collects the statistics of ``adapter`` and selects the property neurons of every property."""
    if not (store / "zarr.json").is_file():
        collect(selection_corpus, adapter, store, CollectConfig(batch_seconds=20.0), overwrite=True, progress=False)
    selections, _ = select_properties(open_stats(store), PROPERTIES)
    return selections


def random_like(neurons: NeuronSet, avoid: NeuronSet, width: int, seed: int) -> NeuronSet:
    """As many neurons per layer as ``neurons``, drawn at random among those not in ``avoid``."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer, count in neurons.counts().items():
        pool = np.setdiff1d(np.arange(width), sorted(avoid[layer]))
        out[layer] = rng.choice(pool, count, replace=False)
    return NeuronSet(out, width=width)


def counts_table(selections: dict[str, dict], layers: list[int]) -> str:
    lines = [
        "| model | property | " + " | ".join(f"L{n}" for n in layers) + " | total |",
        "|---" * (len(layers) + 3) + "|",
    ]
    for model, sel in selections.items():
        for prop in PROPERTIES:
            c = sel[prop].neurons.counts()
            lines.append(
                f"| {model} | {prop} | " + " | ".join(str(c.get(n, 0)) for n in layers) + f" | {sum(c.values())} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "claims")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "neurostat" / "claims")
    ap.add_argument("--seeds", type=int, default=5, help="random-neuron controls per ablation")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.19], help="kept fractions for pruning")
    ap.add_argument(
        "--layer", default="weighted", help="what the probes read: weighted (a learnt sum of all layers), last, or N"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny corpora, one seed, one fraction; nothing saved")
    args = ap.parse_args()
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), Path(tmp) / "work", 1, [0.5], "last", sizes=((4, 3), (4, 3)), frames=3000)
        return
    run(args.out, args.work, args.seeds, args.keep, args.layer, sizes=((12, 12), (16, 12)), frames=15_000)


def run(out: Path, work: Path, seeds: int, keep: list[float], view: str, sizes, frames: int) -> None:
    """Writes OUT/<view>/claims.md and probes.json (view: weighted, or layer-N)."""
    work.mkdir(parents=True, exist_ok=True)
    trained = str(demo_model())
    settings = json.loads((Path(trained) / "training.json").read_text())["settings"]
    twin = str(save_random_twin(work / "twin", TrainSettings(**settings)))
    (sel_spk, sel_utt), (probe_spk, probe_utt) = sizes
    selection_corpus = corpus(work, "selection", sel_spk, sel_utt, seed=11, first=200, model=trained)
    probe_corpus = corpus(work, "probe", probe_spk, probe_utt, seed=7, first=300, model=trained)
    model = ModelAdapter.load(trained)
    width, layers = model.width, list(range(1, model.num_layers + 1))
    layer = None if view == "weighted" else (model.num_layers if view == "last" else int(view))
    out = out / ("weighted" if layer is None else f"layer-{layer}")
    out.mkdir(parents=True, exist_ok=True)
    selections = {
        "trained": select(model, selection_corpus, work / "trained.zarr"),
        "random-init twin": select(ModelAdapter.load(twin), selection_corpus, work / "twin.zarr"),
    }
    results = []
    fitted: dict = {}  # the original model's probes, read on every edited model too

    def probed(adapter: ModelAdapter, tasks: tuple[str, ...], **tag) -> tuple[dict, dict]:
        """(own probes' metrics, the original model's probes' metrics) of an edited model."""
        print(f"probing {tag}", flush=True)
        data = extract(adapter, probe_corpus, progress=False)
        views = {}
        for kind in ("own", "fixed") if tag["edit"] in ("ablated", "pruned") else ("own",):
            reuse = fitted if (kind == "fixed" or tag["edit"] == "original") else None  # the original fills it
            r = run_probes(data, tasks, layer, max_train_frames=frames, fitted=reuse)
            results.append({"model": adapter.source, "tag": {**tag, "probes": kind}, **r})
            views[kind] = r["tasks"]
        return views["own"], views.get("fixed", views["own"])

    chosen = selections["trained"]
    all_tasks = ("phone", "phone-type", "gender", "pitch-bin", "log-f0")
    original, _ = probed(model, all_tasks, edit="original")
    untrained, _ = probed(ModelAdapter.load(twin), all_tasks, edit="random-init twin")
    versus = ["| probe | trained | random-init twin |", "|---|---|---|"]
    for t in all_tasks:
        for metric in ("accuracy", "per", "r2"):
            if metric in original[t]:
                versus.append(f"| {t} {metric} | {original[t][metric]:.3f} | {untrained[t][metric]:.3f} |")

    def cell(own: dict, fixed: dict, task: str) -> str:
        return f"{own[task]['accuracy']:.3f} / {fixed[task]['accuracy']:.3f}"

    # ablation: gender neurons vs random neurons of the same layers
    gender = chosen["gender"].neurons
    with ablated(model.model, gender):
        own, fixed = probed(model, ("gender", "phone"), edit="ablated", neurons="gender", count=len(gender))
    ablation = ["| removed | neurons | gender acc | phone acc |", "|---|---|---|---|"]
    ablation.append(f"| none | 0 | {cell(original, original, 'gender')} | {cell(original, original, 'phone')} |")
    ablation.append(f"| gender neurons | {len(gender)} | {cell(own, fixed, 'gender')} | {cell(own, fixed, 'phone')} |")
    controls = []
    for seed in range(seeds):
        with ablated(model.model, random_like(gender, gender, width, seed)):
            controls.append(probed(model, ("gender", "phone"), edit="ablated", neurons="random", seed=seed))

    def spread(task: str, view: int) -> str:
        values = [c[view][task]["accuracy"] for c in controls]
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    ablation.append(
        f"| random, same layers ({seeds} seeds) | {len(gender)} | {spread('gender', 0)} / {spread('gender', 1)} | "
        f"{spread('phone', 0)} / {spread('phone', 1)} |"
    )

    # ablation: each phone type's neurons → phone accuracy of each type
    types = list(original["phone"]["accuracy_by_type"])
    table = ["| removed | neurons | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
    by_type = original["phone"]["accuracy_by_type"]
    table.append("| none | 0 | " + " | ".join(f"{by_type[t]:.3f} / {by_type[t]:.3f}" for t in types) + " |")
    for group, members in chosen["phone-type"].groups.items():
        neurons = members & chosen["phone-type"].neurons
        with ablated(model.model, neurons):
            own, fixed = probed(model, ("phone",), edit="ablated", neurons=f"phone-type:{group}", count=len(neurons))
        cells = [
            f"{own['phone']['accuracy_by_type'][t]:.3f} / {fixed['phone']['accuracy_by_type'][t]:.3f}" for t in types
        ]
        table.append(f"| {group} neurons | {len(neurons)} | " + " | ".join(cells) + " |")

    # pruning: protected vs L1 at equal width
    protect = NeuronSet(width=width)
    for prop in PROPERTIES:
        protect = protect | chosen[prop].neurons
    pruning = ["| kept | method | " + " | ".join(all_tasks) + " |", "|---" * (len(all_tasks) + 2) + "|"]
    for fraction in keep:
        for method, protected in (("protected", protect), ("l1", None)):
            net = copy.deepcopy(model.model)
            try:
                prune(net, ratio=fraction, protect=protected)
            except PruneError as e:
                pruning.append(f"| {fraction:.0%} | {method} | not possible: {e} |")
                continue
            pruned = ModelAdapter(net, model.feature_extractor, trained)
            own, fixed = probed(pruned, all_tasks, edit="pruned", method=method, keep=fraction)
            cells = [f"{own[t][headline(t)]:.3f} / {fixed[t][headline(t)]:.3f}" for t in all_tasks]
            pruning.append(f"| {fraction:.0%} | {method} | " + " | ".join(cells) + " |")

    sections = {
        "Property neurons per layer (sigma 0.8)": counts_table(selections, layers),
        "Probes of the trained model and its random-init twin": "\n".join(versus),
        "Ablation: gender neurons vs random neurons (own probes / the original's probes)": "\n".join(ablation),
        "Ablation: each phone type's neurons, phone accuracy per type (own / original's probes)": "\n".join(table),
        "Pruning without retraining (log-f0: R², others: accuracy; own / original's probes)": "\n".join(pruning),
    }
    reads = "a learnt weighted sum of all layers" if layer is None else f"layer {layer}"
    text = f"Probes read {reads}.\n\n" + "\n\n".join(f"### {t}\n\n{body}" for t, body in sections.items())
    print(text)
    (out / "claims.md").write_text(text + "\n")
    save_results(results, out / "probes.json")
    print(f"results: {out / 'claims.md'}, {out / 'probes.json'}")


if __name__ == "__main__":
    main()
