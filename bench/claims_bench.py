"""The paper's two claims, measured offline on the shipped demo model (neurostat.tiny).

    python bench/claims_bench.py             # a quicker run of the same measurements (4 utterances, 4,000 frames)
    python bench/claims_bench.py --probe-utterances 12 --frames 15000   # the committed full-size run (bench/RESULTS.md)
    python bench/claims_bench.py --redraw    # the tables again from the last run's measurements (WORK/runs.pkl)
    python bench/claims_bench.py --smoke     # a tiny run of every step (CI)

1. Property neurons (phone-type, gender, pitch; the paper's rule, sigma 0.8) per layer, in the trained
   model and in its random-init twin, selected on statistics of each token choice: phone-mid (the paper's,
   one token per phone run) and all frames; with the (group, phone) cells that hold fewer than D/k tokens,
   where one top-k hit is above chance.
2. Ablation: removing the gender neurons, and each phone type's neurons, vs as many random neurons in
   the same layers (none of them the property's group neurons; several seeds): the drop of the gender,
   phone and per-type phone accuracy, and a one-sided paired t-test over the splits of a kind of the
   property neurons' change against the random controls' mean change in the same split (H1: below it).
3. Pruning: keeping each layer's property neurons plus the highest-L1 rest ("protected") vs plain L1
   pruning and vs keeping as many random neurons per layer as are protected (none of them property
   neurons; several seeds) plus the highest-L1 rest ("random-protected"), at equal width (50 %, 30 %, 19 %
   kept), no retraining; one-sided paired t-tests over the splits (H1: protected ahead of L1, of the
   random protection's mean in the same split).

The neurons of 2 and 3 are selected on the tokens --tokens names (default phone-mid, the paper's).  They are
selected on one synthetic corpus and probed on another (other speakers); both speak with voices the model
never heard in training.  Every model's features are extracted once and probed in both views (the top
layer; a learnt weighted sum of all layers) and in every split: speaker-disjoint splits (seeds), and
voice-disjoint splits that hold out one espeak voice variant per gender (every distinct one), so no test
speaker's voice is among the probes' training speakers.  Edited models are read by the original model's
probes of the same view and split ("fixed": a head that is not retrained) and, in the speaker splits, by
probes refitted on them ("own": what information is left; not for the random controls).  Tables give the
mean ± s.d. over splits; probes.json holds every split's result, tagged for ``neurostat report``.
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
import scipy.stats
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
from neurostat.model.loading import adapter_for, load_adapter, load_geometry  # noqa: E402
from neurostat.model.pruning import PruneError, prune  # noqa: E402
from neurostat.neuronset import NeuronSet  # noqa: E402
from neurostat.probe import extract, headline, run_probes, save_results, speaker_split  # noqa: E402
from neurostat.select import GroupSpec, cell_counts, select_properties  # noqa: E402
from neurostat.stats import open_stats  # noqa: E402
from neurostat.store import StoreMeta  # noqa: E402
from neurostat.tiny.train import TrainSettings, save_random_twin  # noqa: E402

PROPERTIES = ("phone-type", "gender", "pitch")
TOKENS = ("phone-mid", "all")
"""The token choices claim 1 selects on: the paper's middle frame of each phone run, and every frame."""
ALL_TASKS = ("phone", "phone-type", "gender", "pitch-bin", "log-f0")
TEST_FRACTION = 0.3
REFIT = ("phone", "log-f0")
"""The probes refitted on each pruned model (the rest are read with the original's probes only)."""
METHODS = ("protected", "l1", "random-protected")
"""Pruning methods: the property neurons protected, none (plain L1), as many random neurons protected."""
CEILING = "ceiling: 1.000 before and after"
"""A change cell whose model scores 1 in every split before and after the edit: no effect can be measured."""


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
            f"random controls of {self.seeds} seeds each; {self.speaker_splits} speaker splits, "
            f"{self.voice_splits} voice splits"
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


@dataclass(frozen=True)
class Counted:
    """One model's property neurons on one token choice: per property the count per layer, and its
    (group, phone) cells that hold fewer than D/k tokens, of all its cells."""

    counts: dict[str, dict[int, int]]
    thin: dict[str, tuple[int, int]]


@dataclass
class Measured:
    """Everything the tables are written from; pickled to WORK/runs.pkl so ``--redraw`` rewrites them."""

    sizes: Sizes
    tokens: str
    splits: list[Split]
    views: dict[str, int | None]
    num_layers: int
    held_out: list[str]
    selected: dict[str, dict[str, Counted]]  # token choice → model → its property neurons
    runs: dict
    results: list[dict]


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


def select(adapter: ModelAdapter, selection_corpus: PreparedCorpus, store: Path, tokens: str) -> tuple[dict, Counted]:
    """Collects the top-k statistics of ``adapter`` on ``tokens`` (again if the store holds other weights
    or tokens) and selects the property neurons of every property; with their counts and thin cells."""
    meta = StoreMeta.read(store) if (store / "zarr.json").is_file() else None
    if (
        meta is None
        or not meta.complete
        or meta.fingerprint.get("weights") != adapter.hash_weights()
        or meta.fingerprint.get("tokens") != tokens
    ):
        config = CollectConfig(stats=("topk",), tokens=tokens, batch_seconds=20.0)
        collect(selection_corpus, adapter, store, config, overwrite=True, progress=False)
    stats = open_stats(store)
    selections, _ = select_properties(stats, PROPERTIES)
    small = int(np.ceil(1 / stats.chance))
    thin = {}
    for prop in PROPERTIES:
        cells = np.concatenate([n for _, n in cell_counts(stats, GroupSpec.builtin(prop, stats)).values()])
        thin[prop] = (int((cells < small).sum()), len(cells))
    return selections, Counted({p: s.neurons.counts() for p, s in selections.items()}, thin)


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


def measure(model: ModelAdapter, twin: ModelAdapter, chosen: dict, probe: Prober, sizes: Sizes, tokens: str) -> dict:
    """Probes the original, its twin, every ablation (property and random neurons) and every pruning
    (protected, L1, random-protected)."""
    runs: dict = {"original": probe(model, ALL_TASKS, edit="original")}
    runs["twin"] = probe(twin, ALL_TASKS, edit="random-init twin")
    runs["ablation"], runs["random"] = {}, {}
    targets = {"gender": (chosen["gender"].neurons, chosen["gender"], ("gender", "phone"))}
    for group, members in chosen["phone-type"].groups.items():
        targets[group] = (members & chosen["phone-type"].neurons, chosen["phone-type"], ("phone",))
    for name, (neurons, selection, tasks) in targets.items():
        with ablated(model.model, neurons):
            tag = {"neurons": name, "count": len(neurons), "tokens": tokens}
            runs["ablation"][name] = probe(model, tasks, tasks, edit="ablated", **tag)
        avoid = NeuronSet(width=model.width)
        for members in selection.groups.values():
            avoid = avoid | members
        runs["random"][name] = []
        for seed in range(sizes.seeds):
            with ablated(model.model, neurons.random_like(seed, avoid=avoid, width=model.width)):
                tag = {"neurons": f"random like {name}", "seed": seed, "tokens": tokens}
                runs["random"][name].append(probe(model, tasks, edit="ablated", **tag))
    protect = NeuronSet(width=model.width)
    for prop in PROPERTIES:
        protect = protect | chosen[prop].neurons
    runs["pruned"] = {}
    for fraction in sizes.keep:
        for method in METHODS:
            if method == "random-protected":  # as many per layer, drawn among the other neurons
                protected = [protect.random_like(seed, avoid=protect, width=model.width) for seed in range(sizes.seeds)]
            else:
                protected = [protect if method == "protected" else None]
            got = []
            for seed, neurons in enumerate(protected):
                net = copy.deepcopy(model.model)
                try:
                    prune(net, ratio=fraction, protect=neurons)
                except PruneError as e:
                    got = str(e)
                    break
                pruned = adapter_for(net, model.feature_extractor, model.source)
                tag = {"edit": "pruned", "method": method, "keep": fraction, "tokens": tokens}
                if method == "random-protected":  # a control: the original's probes only
                    got.append(probe(pruned, ALL_TASKS, **tag, seed=seed))
                else:
                    got.append(probe(pruned, ALL_TASKS, REFIT, **tag))
            runs["pruned"][fraction, method] = got
    return runs


def spread(values, points: bool = False) -> str:
    """``mean ± s.d.`` (sample s.d.; none for one value): a level to 3 decimals, or signed points to 1."""
    v = np.asarray(values, dtype=float).ravel()
    mean = f"{v.mean():+.1f}" if points else f"{v.mean():.3f}"
    return mean if len(v) < 2 else f"{mean} ± {v.std(ddof=1):.{1 if points else 3}f}"


@dataclass(frozen=True)
class PairedTest:
    """A one-sided t-test of per-split differences (paired per split): t, its degrees of freedom, p."""

    t: float
    df: int
    p: float

    def __str__(self) -> str:
        return "p < 0.001" if self.p < 0.001 else f"p = {self.p:.3f}"


def paired_test(differences, alternative: str) -> PairedTest | None:
    """The one-sample t-test of the per-split differences against 0, H1: their mean is below 0 (``less``)
    or above (``greater``); df = splits − 1.  None with fewer than 2 splits or differences all equal."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return None
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    p = scipy.stats.t.sf(t if alternative == "greater" else -t, len(d) - 1)
    return PairedTest(float(t), len(d) - 1, float(p))


def cell(changes, test: PairedTest | None = None) -> str:
    """Signed points ``mean ± s.d.``, with the test's p-value when there is one."""
    return spread(changes, True) + (f" ({test})" if test else "")


class Table:
    """Reads one view's metrics in one kind of split out of the Prober's results."""

    def __init__(self, view: str, kind: str, all_splits: list[Split]):
        self.keys = [(view, s.name) for s in all_splits if s.kind == kind]

    def values(self, run: dict, probes: str, task: str, metric: str, sub: str | None = None) -> np.ndarray:
        """The metric in each split (``sub``: a key inside it, e.g. a phone type of accuracy_by_type)."""
        got = [run[k][probes][task][metric] for k in self.keys]
        return np.asarray([g[sub] for g in got] if sub else got, dtype=float)

    def changes(self, runs: list[dict], base: dict, probes: str, task: str, metric: str, sub=None) -> np.ndarray:
        """Points of change from ``base``'s own probes, paired per split: [run, split]."""
        before = self.values(base, "own", task, metric, sub)
        return np.asarray([100 * (self.values(r, probes, task, metric, sub) - before) for r in runs])

    def at_ceiling(self, runs: list[dict], base: dict, probes: str, task: str, metric: str, sub=None) -> bool:
        """Whether ``base`` and every run score 1 in every split: a change cannot be measured there."""
        levels = [self.values(base, "own", task, metric, sub)]
        levels += [self.values(r, probes, task, metric, sub) for r in runs]
        return bool(all((v == 1.0).all() for v in levels))

    def edited(self, group: list[dict], base: dict, probes: str, task: str, sub=None) -> str:
        """The change of an edited model from ``base`` (points, pooled over ``group``'s runs, paired per split;
        ``sub``: a phone type's accuracy)."""
        metric = "accuracy_by_type" if sub else headline(task)
        if self.at_ceiling(group, base, probes, task, metric, sub):
            return CEILING
        return cell(self.changes(group, base, probes, task, metric, sub))

    def versus(self, run: dict, others: list[dict], base: dict, probes: str, task: str, sub=None, h1="greater") -> str:
        """``run`` − ``others`` (points, paired per split; several runs: their mean in each split; log-f0:
        R² × 100), with the one-sided test of H1: the difference is ``h1`` (greater or less) than 0."""
        metric = "accuracy_by_type" if sub else headline(task)
        if self.at_ceiling([run, *others], base, probes, task, metric, sub):
            return CEILING
        mine = self.values(run, probes, task, metric, sub)
        theirs = np.mean([self.values(r, probes, task, metric, sub) for r in others], axis=0)
        return cell(100 * (mine - theirs), paired_test(100 * (mine - theirs), h1))


def kinds_of(all_splits: list[Split]) -> list[str]:
    return [k for k in ("speaker", "voice") if any(s.kind == k for s in all_splits)]


def counts_table(selected: dict[str, dict[str, Counted]], layers: list[int]) -> str:
    lines = [
        "| tokens | model | property | " + " | ".join(f"L{n}" for n in layers) + " | total | cells < D/k |",
        "|---" * (len(layers) + 5) + "|",
    ]
    for tokens, models in selected.items():
        for model, got in models.items():
            for prop in PROPERTIES:
                c, (thin, cells) = got.counts[prop], got.thin[prop]
                lines.append(
                    f"| {tokens} | {model} | {prop} | " + " | ".join(str(c.get(n, 0)) for n in layers)
                    + f" | {sum(c.values())} | {thin} of {cells} |"
                )  # fmt: skip
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
    """The change of gender, phone and per-type phone accuracy (points) when a set of neurons goes; read
    by the original's probes, each property set minus its random controls too, with its test."""
    cols = [("gender", None), ("phone", None)] + [("phone", x) for x in types]
    rows = []
    for name, run in runs["ablation"].items():
        random, base = runs["random"][name], runs["original"]
        reads = {f"{name} neurons": lambda x, sub, r=run, b=base: t.edited([r], b, probes, x, sub)}
        if probes == "fixed":
            reads[f"random, like {name} ({len(random)} seeds)"] = lambda x, sub, c=random, b=base: t.edited(
                c, b, probes, x, sub
            )
            reads[f"**{name} − random**"] = lambda x, sub, r=run, c=random, b=base: t.versus(
                r, c, b, probes, x, sub, "less"
            )
        for label, read in reads.items():
            cells = [read(task, sub) if task in run[t.keys[0]]["fixed"] else "" for task, sub in cols]
            rows.append(f"| {kind} | {label} | " + " | ".join(cells) + " |")
    return rows


def pruning_rows(t: Table, runs: dict, kind: str, probes: str) -> list[str]:
    """Each method's change from the original, protected − L1 and protected − random protection, paired per
    split with their tests (points; log-f0: R² × 100).  Refitted probes: protected and L1 only."""
    rows, tasks = [], ALL_TASKS if probes == "fixed" else REFIT
    methods = METHODS if probes == "fixed" else METHODS[:2]
    for fraction in sorted({f for f, _ in runs["pruned"]}, reverse=True):
        got = {m: runs["pruned"][fraction, m] for m in methods}
        failed = [r for r in got.values() if isinstance(r, str)]
        if failed:
            rows.append(f"| {kind} | {fraction:.0%} | not possible: {failed[0]} |")
            continue
        for method, group in got.items():
            cells = [t.edited(group, runs["original"], probes, x) for x in tasks]
            label = method if len(group) == 1 else f"{method} ({len(group)} seeds)"
            rows.append(f"| {kind} | {fraction:.0%} | {label} | " + " | ".join(cells) + " |")
        for other in methods[1:]:
            diff = [t.versus(got["protected"][0], got[other], runs["original"], probes, x) for x in tasks]
            rows.append(f"| {kind} | {fraction:.0%} | **protected − {other}** | " + " | ".join(diff) + " |")
    return rows


def tests_note(all_splits: list[Split]) -> str:
    dfs = ", ".join(f"{sum(s.kind == k for s in all_splits) - 1} in {k} splits" for k in kinds_of(all_splits))
    return (
        "p: one-sided paired t-test over the splits of that kind (df = splits − 1: " + dfs + "), of the "
        "property neurons' change minus the random controls' mean change in the same split (H1: below 0), "
        "or of protected − the other method in each split (H1: above 0; random protection: its seeds' mean); "
        "not corrected for the number of cells tested, and the splits share speakers, so they are not "
        "independent samples. ceiling: the model scores 1.000 in every split before and after, so no "
        "effect can be measured."
    )


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
        "Ablation: change in accuracy (points), the original's probes (random: every seed × split; "
        "set − random: the set's change minus the random seeds' mean change in each split, H1: below 0)": [
            *ablation_head,
            *[r for k in kinds for r in ablation_rows(tables[k], runs, k, "fixed", types)],
        ],
        "Ablation: change in accuracy (points), probes refitted on the ablated model": [
            *ablation_head,
            *ablation_rows(tables["speaker"], runs, "speaker", "own", types),
        ],
        "Pruning without retraining: change (points; log-f0: R² × 100), the original's probes "
        "(random-protected: every seed × split; protected − another method: paired per split, H1: above 0)": [
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

    def row(name: str, cell_of) -> None:
        lines.append(f"| {name} | " + " | ".join(cell_of(Table(v, k, all_splits), k) for v, k in cols) + " |")

    for model in ("original", "twin"):
        row(f"phone accuracy, {model}", lambda t, k, m=model: spread(t.values(runs[m], "own", "phone", "accuracy")))
    types = [g for g in runs["ablation"] if g != "gender"]
    for g in types:
        own, random = runs["ablation"][g], runs["random"][g]
        for label, group in (
            (g, [own]),
            ("other types'", [runs["ablation"][x] for x in types if x != g]),
            ("random", random),
        ):
            row(
                f"2a: {g} accuracy, {label} neurons removed (points)",
                lambda t, k, grp=group, g=g: t.edited(grp, original, "fixed", "phone", g),
            )
        row(
            f"2a: {g} accuracy, {g} − random neurons removed (points; H1: below 0)",
            lambda t, k, g=g, run=own, c=random: t.versus(run, c, original, "fixed", "phone", g, "less"),
        )
    gender, random = runs["ablation"]["gender"], runs["random"]["gender"]
    for label, group in (("gender", [gender]), ("random", random)):
        row(
            f"gender accuracy, {label} neurons removed (points)",
            lambda t, k, grp=group: t.edited(grp, original, "fixed", "gender"),
        )
    for fraction in sorted({f for f, _ in runs["pruned"]}, reverse=True):
        got = {m: runs["pruned"][fraction, m] for m in METHODS}
        if any(isinstance(r, str) for r in got.values()):
            continue
        for method, group in got.items():
            row(
                f"{fraction:.0%} kept, phone, {method} − original (points)",
                lambda t, k, grp=group: t.edited(grp, original, "fixed", "phone"),
            )
        for task in ("phone", "phone-type", "pitch-bin", "log-f0"):
            for other in METHODS[1:]:
                row(
                    f"2b: {fraction:.0%} kept, {task}, protected − {other} (points; H1: above 0)",
                    lambda t, k, task=task, p=got["protected"][0], o=got[other]: t.versus(
                        p, o, original, "fixed", task
                    ),
                )
        refit = lambda t, k, r=got["protected"]: (  # noqa: E731
            t.edited(r, original, "own", "phone") if k == "speaker" else "—"
        )
        row(f"{fraction:.0%} kept protected, phone, refitted − original (points)", refit)
    return head + "\n\n" + "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "claims")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "neurostat" / "claims")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of each random control (ablation and protection)")
    ap.add_argument("--speaker-splits", type=int, default=3, help="speaker-disjoint probe splits (seeds)")
    ap.add_argument("--voice-splits", type=int, default=4, help="distinct voice-disjoint probe splits")
    ap.add_argument("--probe-utterances", type=int, default=4, help="utterances per speaker of the probe corpus")
    ap.add_argument("--frames", type=int, default=4000, help="probe training frames (a seeded sample)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.5, 0.3, 0.19], help="kept fractions for pruning")
    ap.add_argument(
        "--tokens", choices=TOKENS, default="phone-mid",
        help="the token choice whose selection is ablated and protected (claim 1 selects on both)",
    )  # fmt: skip
    ap.add_argument("--workers", type=int, default=2, help="processes fitting probes (one torch thread each)")
    ap.add_argument("--redraw", action="store_true", help="rewrite the tables from WORK/runs.pkl; measure nothing")
    ap.add_argument("--smoke", action="store_true", help="tiny corpora, one seed, one fraction; nothing saved")
    args = ap.parse_args()
    torch.set_num_threads(1)  # on a busy 2-core machine a second thread made the fits 2-4x slower
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = Sizes((4, 3), (8, 1), 500, 1, 2, 1, (0.5,))
            run(Path(tmp) / "out", Path(tmp) / "work", sizes, "all", args.workers)  # all: gender neurons to ablate
            write(Path(tmp) / "redrawn", pickle.loads((Path(tmp) / "work" / "runs.pkl").read_bytes()))
        return
    if args.redraw:
        write(args.out, pickle.loads((args.work / "runs.pkl").read_bytes()))
        return
    sizes = Sizes(
        (12, 12), (16, args.probe_utterances), args.frames, args.seeds, args.speaker_splits, args.voice_splits,
        tuple(args.keep),
    )  # fmt: skip
    run(args.out, args.work, sizes, args.tokens, args.workers)


def run(out: Path, work: Path, sizes: Sizes, tokens: str, workers: int) -> None:
    """Measures everything (into WORK/runs.pkl) and writes the tables (:func:`write`)."""
    work.mkdir(parents=True, exist_ok=True)
    trained = str(demo_model())
    settings = json.loads((Path(trained) / "training.json").read_text())["settings"]
    twin = str(save_random_twin(work / "twin", TrainSettings(**settings)))
    selection_corpus = corpus(work, "selection", sizes.selection, seed=11, first=200, model=trained)
    probe_corpus = corpus(work, f"probe-{sizes.probe[1]}", sizes.probe, seed=7, first=300, model=trained)
    voices = speaker_voices(work / f"probe-{sizes.probe[1]}-raw" / "LibriSpeech")
    model, twin_model = load_adapter(trained), load_adapter(twin)
    views = {"weighted": None, f"layer-{model.num_layers}": model.num_layers}
    selections, selected = {}, {}
    for choice in TOKENS:
        name = "" if choice == "phone-mid" else f"-{choice}"
        for label, adapter, store in (
            ("trained", model, f"trained{name}.zarr"), ("random-init twin", twin_model, f"twin{name}.zarr")
        ):  # fmt: skip
            selections[choice, label], counted = select(adapter, selection_corpus, work / store, choice)
            selected.setdefault(choice, {})[label] = counted
    all_splits = splits(probe_corpus, voices, sizes)
    probe = Prober(probe_corpus, views, all_splits, sizes.frames, workers)
    runs = measure(model, twin_model, selections[tokens, "trained"], probe, sizes, tokens)
    held_out = [
        f"seed {s.seed}: " + " + ".join(sorted({voices[x] for x in speaker_split(
            [r["speaker"] for r in probe_corpus.records], [r["gender"] for r in probe_corpus.records],
            TEST_FRACTION, s.seed, voices)[1]}))
        for s in all_splits if s.kind == "voice"
    ]  # fmt: skip
    measured = Measured(sizes, tokens, all_splits, views, model.num_layers, held_out, selected, runs, probe.results)
    (work / "runs.pkl").write_bytes(pickle.dumps(measured))
    write(out, measured)


def write(out: Path, m: Measured) -> None:
    """Writes OUT/claims.md (both views side by side) and OUT/<view>/claims.md and probes.json."""
    head = (
        f"Sizes: {m.sizes.describe()}.\nVoice-disjoint splits hold out: {'; '.join(m.held_out)}.\n"
        f"Ablated and protected neurons: selected on {m.tokens} tokens.\n"
        "Cells: mean ± s.d. over the splits of that kind; changes are paired per split, in points.\n"
        + tests_note(m.splits)
    )
    counts = "### Property neurons per layer (sigma 0.8), selected on each token choice\n\n" + counts_table(
        m.selected, list(range(1, m.num_layers + 1))
    )
    text = summary(m.runs, list(m.views), m.splits, head) + "\n\n" + counts
    (out / "claims.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "claims.md").write_text(text + "\n")
    print(text)
    for view, layer in m.views.items():
        reads = "a learnt weighted sum of all layers" if layer is None else f"layer {layer}"
        body = view_report(view, m.runs, m.splits, f"Probes read {reads}.\n{head}\n\n{counts}")
        (out / view).mkdir(parents=True, exist_ok=True)
        (out / view / "claims.md").write_text(body + "\n")
        save_results([r for r in m.results if r["tag"]["view"] == view], out / view / "probes.json")
    print(f"results: {out / 'claims.md'}, {out}/<view>/claims.md and probes.json")


if __name__ == "__main__":
    main()
