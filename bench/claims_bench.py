"""The paper's two claims, measured offline on the shipped demo model (neurostat.tiny).

    python bench/claims_bench.py             # ~26 min on 2 busy cores: bench/claims/{claims.md, weighted/, layer-4/}
    python bench/claims_bench.py --probe-utterances 12 --frames 15000   # the committed full-size run: 33 min on 2 cores
    python bench/claims_bench.py --smoke     # a tiny run of every step (CI)

1. Property neurons (phone-type, gender, pitch; the paper's rule, sigma 0.8) per layer, in the trained
   model and in its random-init twin.
2. Ablation: removing the gender neurons, and each phone type's neurons, vs as many random neurons in
   the same layers (none of them the property's group neurons; several seeds): the drop of the gender,
   phone and per-type phone accuracy.
3. Pruning: keeping each layer's property neurons plus the highest-L1 rest ("protected") vs plain L1
   pruning at equal width (50 %, 30 %, 19 % kept), probes of each, no retraining.

Neurons are selected on one synthetic corpus and probed on another (other speakers); both speak with
voices the model never heard in training.  Every model's features are extracted once and probed in
both views (the top layer; a learnt weighted sum of all layers) and in every split: speaker-disjoint
splits (seeds), and voice-disjoint splits that hold out one espeak voice variant per gender (every
distinct one), so no test speaker's voice is among the probes' training speakers.  Edited models are
read by the original model's probes of the same view and split ("fixed": a head that is not retrained)
and, in the speaker splits, by probes refitted on them ("own": what information is left).  Tables give
the mean ± s.d. over splits; probes.json holds every split's result, tagged for ``neurostat report``.
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from neurostat.corpus.prepare import PrepareSettings, prepare  # noqa: E402
from neurostat.corpus.prepared import PreparedCorpus  # noqa: E402
from neurostat.corpus.synth import speaker_voices, synthesize  # noqa: E402
from neurostat.demo import demo_model  # noqa: E402
from neurostat.engine.collect import CollectConfig, collect  # noqa: E402
from neurostat.model.adapter import ModelAdapter  # noqa: E402
from neurostat.model.edit import ablated  # noqa: E402
from neurostat.model.loading import (  # noqa: E402
    adapter_for,
    load_adapter,
    load_geometry,  # noqa: E402
)
from neurostat.model.pruning import PruneError, prune  # noqa: E402
from neurostat.neuronset import NeuronSet  # noqa: E402
from neurostat.probe import extract, headline, run_probes, save_results, speaker_split  # noqa: E402
from neurostat.select import select_properties  # noqa: E402
from neurostat.stats import open_stats  # noqa: E402
from neurostat.tiny.train import TrainSettings, save_random_twin  # noqa: E402

PROPERTIES = ("phone-type", "gender", "pitch")
ALL_TASKS = ("phone", "phone-type", "gender", "pitch-bin", "log-f0")
TEST_FRACTION = 0.3
REFIT = ("phone", "log-f0")
"""The probes refitted on each pruned model (the rest are read with the original's probes only)."""


@dataclass(frozen=True)
class Sizes:
    """What a run measures on: corpora (speakers, utterances), probe training frames, seeds, splits."""

    selection: tuple[int, int]
    probe: tuple[int, int]
    frames: int
    seeds: int
    speaker_splits: int
    voice_splits: int
    keep: tuple[float, ...]

    def describe(self) -> str:
        return (
            f"selection corpus {self.selection[0]} speakers × {self.selection[1]} utterances; probe corpus "
            f"{self.probe[0]} speakers × {self.probe[1]} utterances; ≤ {self.frames} probe training frames; "
            f"{self.seeds} random-neuron seeds; {self.speaker_splits} speaker splits, {self.voice_splits} voice splits"
        )


@dataclass(frozen=True)
class Split:
    """One probe split: speaker-disjoint, or voice-disjoint (``voices``: speaker → held-out unit)."""

    kind: str
    seed: int
    voices: dict | None = None

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.seed}"


def corpus(work: Path, name: str, size: tuple[int, int], seed: int, first: int, model: str) -> PreparedCorpus:
    """A synthetic corpus of unseen voices, prepared for ``model``'s frame geometry (built once)."""
    raw, out = work / f"{name}-raw", work / name
    if not (out / "meta.json").is_file():
        synthesize(raw, "dev-clean", size[0], size[1], seed=seed, progress=False, first_speaker=first)
        prepare(
            raw / "LibriSpeech", "dev-clean", raw / "alignments", out,
            PrepareSettings(load_geometry(model)), progress=False,
        )  # fmt: skip
    return PreparedCorpus(out)


def select(adapter: ModelAdapter, selection_corpus: PreparedCorpus, store: Path) -> dict:
    """Collects the statistics of ``adapter`` (again if the store holds another model's weights) and selects
    the property neurons of every property."""
    if (
        not (store / "zarr.json").is_file()
        or open_stats(store).meta.fingerprint.get("weights") != adapter.hash_weights()
    ):
        collect(selection_corpus, adapter, store, CollectConfig(batch_seconds=20.0), overwrite=True, progress=False)
    selections, _ = select_properties(open_stats(store), PROPERTIES)
    return selections


def splits(probe_corpus: PreparedCorpus, voices: dict[str, str], sizes: Sizes) -> list[Split]:
    """The speaker splits (seeds 0..n-1) and the first ``voice_splits`` distinct voice-disjoint splits."""
    out = [Split("speaker", seed) for seed in range(sizes.speaker_splits)]
    speakers = [r["speaker"] for r in probe_corpus.records]
    genders = [r["gender"] for r in probe_corpus.records]
    seen: set[frozenset] = set()
    for seed in range(50):
        if len(seen) == sizes.voice_splits:
            break
        test = frozenset(speaker_split(speakers, genders, TEST_FRACTION, seed, voices)[1])
        if test not in seen:
            seen.add(test)
            out.append(Split("voice", seed, voices))
    return out


_DATA = None
"""The features being probed, set before the fit workers fork (so they are not pickled per job)."""


def _probe_job(tasks: tuple[str, ...], layer: int | None, split: Split, frames: int, fitted: dict | None):
    """One (view, split, probes) reading of ``_DATA``: (the result, the probes it fitted)."""
    torch.set_num_threads(1)
    return run_probes(_DATA, tasks, layer, split.seed, TEST_FRACTION, frames, fitted, split.voices), fitted


class Prober:
    """Extracts each model's features on the probe corpus once and probes them in every view and split
    (fits in ``workers`` forked single-thread processes); the original model's probes of each (view,
    split) read the edited models too."""

    def __init__(self, probe_corpus: PreparedCorpus, views: dict, splits: list[Split], frames: int, workers: int):
        self.corpus, self.views, self.splits, self.frames = probe_corpus, views, splits, frames
        self.workers = workers
        self.fitted: dict[tuple[str, str], dict] = {}
        self.results: list[dict] = []

    def __call__(self, adapter: ModelAdapter, tasks: tuple[str, ...], refit: tuple[str, ...] = (), **tag) -> dict:
        """{(view, split name): {"own": metrics, "fixed": the original's probes' metrics}}.  The original and
        the twin get their own probes; an edited model the original's, and in speaker splits its own probes
        of the ``refit`` tasks too."""
        global _DATA
        print(f"probing {tag}", flush=True)
        _DATA = extract(adapter, self.corpus, progress=False)
        mine = tag["edit"] in ("original", "random-init twin")
        jobs = []
        for view, layer in self.views.items():
            for split in self.splits:
                key = (view, split.name)
                if mine:
                    fitted = self.fitted.setdefault(key, {}) if tag["edit"] == "original" else None
                    jobs.append((key, "own", (tasks, layer, split, self.frames, fitted)))
                    continue
                jobs.append((key, "fixed", (tasks, layer, split, self.frames, self.fitted[key])))
                if refit and split.kind == "speaker":
                    jobs.append((key, "own", (refit, layer, split, self.frames, None)))
        with multiprocessing.get_context("fork").Pool(self.workers) as pool:
            done = pool.starmap(_probe_job, [args for _, _, args in jobs])
        out: dict = {}
        for (key, kind, args), (r, fitted) in zip(jobs, done):
            if tag["edit"] == "original":
                self.fitted[key] = fitted
            split_tag = {"view": key[0], "split": args[2].kind, "split_seed": args[2].seed, "probes": kind}
            self.results.append({"model": adapter.source, "tag": {**tag, **split_tag}, **r})
            out.setdefault(key, {})[kind] = r["tasks"]
        for views in out.values():
            views.setdefault("fixed", views.get("own"))
        return out


def spread(values: list[float], points: bool = False) -> str:
    """``mean ± s.d.`` (sample s.d.; none for one value): a level to 3 decimals, or signed points to 1."""
    v = np.asarray(values, dtype=float)
    mean = f"{v.mean():+.1f}" if points else f"{v.mean():.3f}"
    return mean if len(v) < 2 else f"{mean} ± {v.std(ddof=1):.{1 if points else 3}f}"


class Table:
    """Reads one view's metrics in one kind of split out of the Prober's results."""

    def __init__(self, view: str, kind: str, all_splits: list[Split]):
        self.keys = [(view, s.name) for s in all_splits if s.kind == kind]

    def values(self, run: dict, probes: str, task: str, metric: str, sub: str | None = None) -> list[float]:
        """The metric in each split (``sub``: a key inside it, e.g. a phone type of accuracy_by_type)."""
        got = [run[k][probes][task][metric] for k in self.keys]
        return [g[sub] for g in got] if sub else got

    def change(self, runs: list[dict], base: dict, probes: str, task: str, metric: str, sub=None) -> list[float]:
        """Points of change from ``base``'s own probes, paired per split, pooled over ``runs``."""
        before = self.values(base, "own", task, metric, sub)
        return [100 * (a - b) for r in runs for a, b in zip(self.values(r, probes, task, metric, sub), before)]


def kinds_of(all_splits: list[Split]) -> list[str]:
    return [k for k in ("speaker", "voice") if any(s.kind == k for s in all_splits)]


def measure(model: ModelAdapter, twin: ModelAdapter, chosen: dict, probe: Prober, sizes: Sizes) -> dict:
    """Probes the original, its twin, every ablation (property and random neurons) and every pruning."""
    runs: dict = {"original": probe(model, ALL_TASKS, edit="original")}
    runs["twin"] = probe(twin, ALL_TASKS, edit="random-init twin")
    runs["ablation"], runs["random"] = {}, {}
    targets = {"gender": (chosen["gender"].neurons, chosen["gender"], ("gender", "phone"))}
    for group, members in chosen["phone-type"].groups.items():
        targets[group] = (members & chosen["phone-type"].neurons, chosen["phone-type"], ("phone",))
    for name, (neurons, selection, tasks) in targets.items():
        with ablated(model.model, neurons):
            runs["ablation"][name] = probe(model, tasks, tasks, edit="ablated", neurons=name, count=len(neurons))
        avoid = NeuronSet(width=model.width)
        for members in selection.groups.values():
            avoid = avoid | members
        runs["random"][name] = []
        for seed in range(sizes.seeds):
            with ablated(model.model, neurons.random_like(seed, avoid=avoid, width=model.width)):
                tag = {"neurons": f"random like {name}", "seed": seed}
                runs["random"][name].append(probe(model, tasks, edit="ablated", **tag))
    protect = NeuronSet(width=model.width)
    for prop in PROPERTIES:
        protect = protect | chosen[prop].neurons
    runs["pruned"] = {}
    for fraction in sizes.keep:
        for method, protected in (("protected", protect), ("l1", None)):
            net = copy.deepcopy(model.model)
            try:
                prune(net, ratio=fraction, protect=protected)
            except PruneError as e:
                runs["pruned"][fraction, method] = str(e)
                continue
            pruned = adapter_for(net, model.feature_extractor, model.source)
            runs["pruned"][fraction, method] = probe(
                pruned, ALL_TASKS, REFIT, edit="pruned", method=method, keep=fraction
            )
    return runs


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


def versus_rows(t: Table, runs: dict, kind: str) -> list[str]:
    rows = []
    for task in ALL_TASKS:
        for metric in ("accuracy", "per", "r2"):
            if metric in runs["original"][t.keys[0]]["own"][task]:
                levels = [spread(t.values(runs[r], "own", task, metric)) for r in ("original", "twin")]
                rows.append(f"| {kind} | {task} {metric} | " + " | ".join(levels) + " |")
    return rows


def ablation_rows(t: Table, runs: dict, kind: str, probes: str, types: list[str]) -> list[str]:
    """The change of gender, phone and per-type phone accuracy (points) when a set of neurons goes."""
    cols = [("gender", None), ("phone", None)] + [("phone", x) for x in types]
    rows = []
    for name, run in runs["ablation"].items():
        sets = [(f"{name} neurons", [run])]
        if probes == "fixed":
            sets.append((f"random, like {name} ({len(runs['random'][name])} seeds)", runs["random"][name]))
        for label, group in sets:
            cells = [
                spread(
                    t.change(group, runs["original"], probes, task, sub and "accuracy_by_type" or "accuracy", sub), True
                )
                if task in group[0][t.keys[0]]["fixed"]
                else ""
                for task, sub in cols
            ]
            rows.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return rows


def pruning_rows(t: Table, runs: dict, kind: str, probes: str) -> list[str]:
    """Each method's change from the original and protected − L1, paired per split (points; log-f0: R² × 100)."""
    rows, tasks = [], ALL_TASKS if probes == "fixed" else REFIT
    for fraction in sorted({f for f, _ in runs["pruned"]}, reverse=True):
        got = {m: runs["pruned"][fraction, m] for m in ("protected", "l1")}
        failed = [r for r in got.values() if isinstance(r, str)]
        if failed:
            rows.append(f"| {kind} | {fraction:.0%} | not possible: {failed[0]} |")
            continue
        for method, run in got.items():
            cells = [spread(t.change([run], runs["original"], probes, x, headline(x)), True) for x in tasks]
            rows.append(f"| {kind} | {fraction:.0%} | {method} | " + " | ".join(cells) + " |")
        diff = []
        for task in tasks:
            p, q = (t.values(got[m], probes, task, headline(task)) for m in ("protected", "l1"))
            diff.append(spread([100 * (a - b) for a, b in zip(p, q)], True))
        rows.append(f"| {kind} | {fraction:.0%} | **protected − L1** | " + " | ".join(diff) + " |")
    return rows


def view_report(view: str, runs: dict, all_splits: list[Split], head: str) -> str:
    """One view's claims.md: every table, with rows for the speaker splits and the voice splits."""
    kinds = kinds_of(all_splits)
    tables = {k: Table(view, k, all_splits) for k in kinds}
    types = list(runs["original"][tables["speaker"].keys[0]]["own"]["phone"]["accuracy_by_type"])
    ablation_head = ["| split | removed | gender | phone | " + " | ".join(f"phone: {x}" for x in types) + " |"]
    ablation_head.append("|---" * (len(types) + 4) + "|")
    pruning_head = ["| split | kept | method | " + " | ".join(ALL_TASKS) + " |", "|---" * (len(ALL_TASKS) + 3) + "|"]
    sections = {
        "Probes of the trained model and its random-init twin (each model's own probes)": [
            "| split | probe | trained | random-init twin |",
            "|---|---|---|---|",
            *[r for k in kinds for r in versus_rows(tables[k], runs, k)],
        ],
        "Ablation: change in accuracy (points), the original's probes (random: every seed × split)": [
            *ablation_head,
            *[r for k in kinds for r in ablation_rows(tables[k], runs, k, "fixed", types)],
        ],
        "Ablation: change in accuracy (points), probes refitted on the ablated model": [
            *ablation_head,
            *ablation_rows(tables["speaker"], runs, "speaker", "own", types),
        ],
        "Pruning without retraining: change (points; log-f0: R² × 100), the original's probes": [
            *pruning_head,
            *[r for k in kinds for r in pruning_rows(tables[k], runs, k, "fixed")],
        ],
        "Pruning without retraining: change (points; log-f0: R² × 100), probes refitted on the pruned model": [
            "| split | kept | method | " + " | ".join(REFIT) + " |",
            "|---" * (len(REFIT) + 3) + "|",
            *pruning_rows(tables["speaker"], runs, "speaker", "own"),
        ],
    }
    return head + "\n\n" + "\n\n".join(f"### {t}\n\n" + "\n".join(body) for t, body in sections.items())


def summary(runs: dict, views: list[str], all_splits: list[Split], head: str) -> str:
    """The headline measures of both views side by side, each over its splits (bench/claims/claims.md)."""
    cols = [(v, k) for v in views for k in kinds_of(all_splits)]
    lines = ["| measure | " + " | ".join(f"{v}, {k} splits" for v, k in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    original = runs["original"]

    def row(name: str, cell) -> None:
        lines.append(f"| {name} | " + " | ".join(cell(Table(v, k, all_splits), k) for v, k in cols) + " |")

    for model in ("original", "twin"):
        row(f"phone accuracy, {model}", lambda t, k, m=model: spread(t.values(runs[m], "own", "phone", "accuracy")))
    types = [g for g in runs["ablation"] if g != "gender"]
    for g in types:
        others = [runs["ablation"][x] for x in types if x != g]
        for label, group in ((g, [runs["ablation"][g]]), ("other types'", others), ("random", runs["random"][g])):
            change = lambda t, k, grp=group, g=g: spread(  # noqa: E731
                t.change(grp, original, "fixed", "phone", "accuracy_by_type", g), True
            )
            row(f"2a: {g} accuracy, {label} neurons removed (points)", change)
    for label, group in (("gender", [runs["ablation"]["gender"]]), ("random", runs["random"]["gender"])):
        row(
            f"gender accuracy, {label} neurons removed (points)",
            lambda t, k, grp=group: spread(t.change(grp, original, "fixed", "gender", "accuracy"), True),
        )
    for (fraction, method), run in runs["pruned"].items():
        if method != "protected" or isinstance(run, str) or isinstance(runs["pruned"][fraction, "l1"], str):
            continue
        l1 = runs["pruned"][fraction, "l1"]
        for task in ("phone", "phone-type", "pitch-bin", "log-f0"):
            diff = lambda t, k, r=run, task=task, l1=l1: spread(  # noqa: E731
                [100 * (a - b) for a, b in zip(*(t.values(x, "fixed", task, headline(task)) for x in (r, l1)))], True
            )
            row(f"2b: {fraction:.0%} kept, {task}, protected − L1 (points)", diff)
        refit = lambda t, k, r=run: (  # noqa: E731
            spread(t.change([r], original, "own", "phone", "accuracy"), True) if k == "speaker" else "—"
        )
        row(f"{fraction:.0%} kept protected, phone, refitted − original (points)", refit)
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "claims")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "neurostat" / "claims")
    ap.add_argument("--seeds", type=int, default=3, help="random-neuron controls per ablation")
    ap.add_argument("--speaker-splits", type=int, default=3, help="speaker-disjoint probe splits (seeds)")
    ap.add_argument("--voice-splits", type=int, default=4, help="distinct voice-disjoint probe splits")
    ap.add_argument("--probe-utterances", type=int, default=4, help="utterances per speaker of the probe corpus")
    ap.add_argument("--frames", type=int, default=4000, help="probe training frames (a seeded sample)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.19], help="kept fractions for pruning")
    ap.add_argument("--workers", type=int, default=2, help="processes fitting probes (one torch thread each)")
    ap.add_argument("--smoke", action="store_true", help="tiny corpora, one seed, one fraction; nothing saved")
    args = ap.parse_args()
    torch.set_num_threads(1)  # on a busy 2-core machine a second thread made the fits 2-4x slower
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), Path(tmp) / "work", Sizes((4, 3), (8, 1), 1000, 1, 2, 1, (0.5,)), args.workers)
        return
    sizes = Sizes(
        (12, 12), (16, args.probe_utterances), args.frames, args.seeds, args.speaker_splits, args.voice_splits,
        tuple(args.keep),
    )  # fmt: skip
    run(args.out, args.work, sizes, args.workers)


def run(out: Path, work: Path, sizes: Sizes, workers: int) -> None:
    """Writes OUT/claims.md (both views side by side) and OUT/<view>/claims.md and probes.json."""
    work.mkdir(parents=True, exist_ok=True)
    trained = str(demo_model())
    settings = json.loads((Path(trained) / "training.json").read_text())["settings"]
    twin = str(save_random_twin(work / "twin", TrainSettings(**settings)))
    selection_corpus = corpus(work, "selection", sizes.selection, seed=11, first=200, model=trained)
    probe_corpus = corpus(work, f"probe-{sizes.probe[1]}", sizes.probe, seed=7, first=300, model=trained)
    voices = speaker_voices(work / f"probe-{sizes.probe[1]}-raw" / "LibriSpeech")
    model = load_adapter(trained)
    views = {"weighted": None, f"layer-{model.num_layers}": model.num_layers}
    selections = {
        "trained": select(model, selection_corpus, work / "trained.zarr"),
        "random-init twin": select(load_adapter(twin), selection_corpus, work / "twin.zarr"),
    }
    all_splits = splits(probe_corpus, voices, sizes)
    probe = Prober(probe_corpus, views, all_splits, sizes.frames, workers)
    runs = measure(model, load_adapter(twin), selections["trained"], probe, sizes)
    (work / "runs.pkl").write_bytes(pickle.dumps((runs, probe.results)))  # the tables can be redrawn from it
    held_out = [
        f"seed {s.seed}: " + " + ".join(sorted({voices[x] for x in speaker_split(
            [r["speaker"] for r in probe_corpus.records], [r["gender"] for r in probe_corpus.records],
            TEST_FRACTION, s.seed, voices)[1]}))
        for s in all_splits if s.kind == "voice"
    ]  # fmt: skip
    head = (
        f"Sizes: {sizes.describe()}.\nVoice-disjoint splits hold out: {'; '.join(held_out)}.\n"
        "Cells: mean ± s.d. over the splits of that kind; changes are paired per split, in points."
    )
    counts = "### Property neurons per layer (sigma 0.8)\n\n" + counts_table(
        selections, list(range(1, model.num_layers + 1))
    )
    text = summary(runs, list(views), all_splits, head) + "\n\n" + counts
    (out / "claims.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(text + "\n")
    print(text)
    for view, layer in views.items():
        reads = "a learnt weighted sum of all layers" if layer is None else f"layer {layer}"
        body = view_report(view, runs, all_splits, f"Probes read {reads}.\n{head}\n\n{counts}")
        (out / view).mkdir(parents=True, exist_ok=True)
        (out / view / "claims.md").write_text(body + "\n")
        save_results([r for r in probe.results if r["tag"]["view"] == view], out / view / "probes.json")
    print(f"results: {out / 'claims.md'}, {out}/<view>/claims.md and probes.json")


if __name__ == "__main__":
    main()
