"""``neurostat report``: a store's property neurons as pictures and one self-contained HTML page.

Figures (PNG, matplotlib without a display): property neurons per layer for each property (the paper's
figure); the overlaps between properties as an UpSet-style chart of exclusive regions (each bar counts
the neurons in exactly the marked sets); for each property, a heatmap of P(j | label) over its axis for
its most selective neurons; and per layer, the histogram of each neuron's activating probability over
all tokens.  The page embeds them and the numbers behind them (the selector's counts per layer, the
overlap regions), so it can be mailed or opened from disk.

With probe results (``neurostat probe --out`` or ``bench/claims_bench.py``, whose entries carry tags), the
report adds the paper's evidence: ablation bars (each probe's metric for the original model and each
set of removed neurons) and pruning curves (metric against the kept fraction, one line per pruning method,
the original as a dashed line); results that differ only in a seed (random sets, probe splits) are pooled
as mean ± s.d.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import check_out_folder, has_page
from .neuronset import NeuronSet, NeuronSetError
from .probe import headline, load_results
from .select import PROPERTIES, GroupSpec, has_labels, property_sets, venn
from .stats import Stats, open_stats

HEATMAP_NEURONS = 40


class ReportError(ValueError):
    """A store or neuron files a report cannot be made from; the message says why."""


@dataclass
class Figure:
    name: str
    title: str
    png: bytes


def render_figure(draw, name: str, title: str, size=(8, 4)) -> Figure:
    """A figure drawn by ``draw(fig)`` as a PNG with its name and title (the report's and the diff page's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=100)
    draw(fig)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return Figure(name, title, buffer.getvalue())


def _per_layer(stats: Stats, sets: dict[str, NeuronSet]) -> Figure:
    def draw(fig):
        ax = fig.add_subplot()
        for name, neurons in sets.items():
            counts = neurons.counts()
            ax.plot(stats.layers, [counts.get(n, 0) for n in stats.layers], marker="o", label=name)
        ax.set_xlabel("layer")
        ax.set_ylabel("property neurons")
        ax.set_xticks(stats.layers, [stats.names[n] for n in stats.layers])
        ax.legend()

    return render_figure(draw, "neurons_per_layer", "Property neurons per layer")


def _overlaps(sets: dict[str, NeuronSet], regions: dict[str, int]) -> Figure:
    names = list(sets)
    order = sorted(regions, key=lambda key: -regions[key])

    def draw(fig):
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        x = np.arange(len(order))
        top.bar(x, [regions[key] for key in order], color="#4c72b0")
        for i, key in enumerate(order):
            top.annotate(str(regions[key]), (i, regions[key]), ha="center", va="bottom", fontsize=8)
        top.set_ylabel("neurons (exclusive region)")
        for row, name in enumerate(names):
            member = [name in key.split("&") for key in order]
            bottom.scatter(x, [row] * len(order), c=["black" if m else "#dddddd" for m in member], s=40)
        bottom.set_yticks(range(len(names)), names)
        bottom.set_xticks(x, [""] * len(order))

    return render_figure(draw, "overlaps", "Overlaps between properties (UpSet: each bar is one exclusive region)")


def _heatmap(stats: Stats, name: str, neurons: NeuronSet) -> Figure | None:
    """P(j | label of the property's axis) for the set's most selective neurons (largest max P − min P)."""
    axis = GroupSpec.builtin(name, stats).axis if name in PROPERTIES and has_labels(stats, name) else "phone"
    prob = stats.probability("topk", by=(axis,)).values  # [layer, label, neuron]
    rows = [(n, j) for n in neurons.layers for j in sorted(neurons[n]) if n in stats.layers]
    if not rows:
        return None
    values = np.stack([prob[stats.layers.index(n), :, j] for n, j in rows])
    spread = np.nanmax(values, axis=1) - np.nanmin(values, axis=1)
    keep = np.argsort(-np.nan_to_num(spread), kind="stable")[:HEATMAP_NEURONS]
    labels = list(stats.label_space.vocab(axis))

    def draw(fig):
        ax = fig.add_subplot()
        image = ax.imshow(values[keep], aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(keep)), [f"L{rows[i][0]}/{rows[i][1]}" for i in keep], fontsize=7)
        ax.set_xlabel(axis)
        fig.colorbar(image, ax=ax, label=f"P(j | {axis})")

    title = f"{name}: P(j | {axis}) of its {len(keep)} most selective neurons (chance {stats.chance:.3f})"
    return render_figure(draw, f"probability_{name}", title, size=(10, 2 + 0.18 * len(keep)))


def _histograms(stats: Stats) -> Figure:
    counts = stats.reduce("topk_count", by=(stats.parts[0],)).values.sum(axis=1)  # [layer, neuron]
    tokens = float(stats.tokens((stats.parts[0],)).values.sum())
    prob = counts / max(tokens, 1.0)
    cols = min(4, len(stats.layers))
    rows = -(-len(stats.layers) // cols)

    def draw(fig):
        axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, squeeze=False)).ravel()
        for ax, layer, p in zip(axes, stats.layers, prob):
            ax.hist(p, bins=40, color="#55a868")
            ax.axvline(stats.chance, color="black", linestyle=":", linewidth=1)
            ax.set_title(f"layer {stats.names[layer]}", fontsize=9)
        for ax in axes[len(stats.layers) :]:
            ax.axis("off")

    return render_figure(
        draw, "probability_histograms", "Activating probability P(j) per layer (dotted: chance k/D)", (10, 2.2 * rows)
    )


def _value(tasks: dict, task: str) -> float | None:
    """A probe result's headline metric of ``task`` (None when the task was not probed)."""
    return tasks[task][headline(task)] if task in tasks else None


def _metric_name(task: str) -> str:
    return {"r2": "R²"}.get(headline(task), headline(task))


def _kind(result: dict) -> str:
    """' (fixed probes)' for an edited model read with the original model's probes."""
    return " (fixed probes)" if result.get("tag", {}).get("probes") == "fixed" else ""


POOLED = ("split_seed", "seed")
"""Tag keys whose results are pooled into one bar or point (mean ± s.d.): the probe split's seed and a
random neuron set's seed."""
CONTEXT = ("view", "split")
"""Tag keys one figure never mixes (``bench/claims_bench.py``: the layers the probes read, the kind of split)."""


def probe_results(path: str | Path, where: dict[str, str] | None = None) -> list[dict]:
    """The probe results of ``path`` whose tags have every ``where`` value; an error when none do, or when
    what is left mixes several values of a :data:`CONTEXT` key (a figure would pool unlike measurements)."""
    results = load_results(path)
    where = where or {}
    kept = [r for r in results if all(str(r.get("tag", {}).get(k)) == v for k, v in where.items())]
    if results and not kept:
        tags = sorted({f"{k}={v}" for r in results for k, v in r.get("tag", {}).items() if k in where})
        raise ReportError(
            f"{path}: no result has {', '.join(f'{k}={v}' for k, v in where.items())} "
            f"(its results have {', '.join(tags) or 'no such tags'})"
        )
    for key in CONTEXT:
        values = sorted({str(r["tag"][key]) for r in kept if key in r.get("tag", {})})
        if len(values) > 1:
            raise ReportError(
                f"{path}: results of {len(values)} {key}s ({', '.join(values)}) would be pooled in one figure; "
                f"choose one with --probe-where {key}=VALUE"
            )
    return kept


@dataclass
class Bar:
    """One bar of a probe figure: the mean and s.d. of a metric over ``n`` pooled results."""

    name: str
    mean: float
    sd: float
    n: int


def _bar(name: str, values: list[float]) -> Bar:
    """Mean and sample s.d. (as bench/claims_bench.py's tables give them; 0 for one value)."""
    sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return Bar(name, float(np.mean(values)), sd, len(values))


def _with_edit(results: list[dict], edit: str) -> list[dict]:
    return [r for r in results if r.get("tag", {}).get("edit") == edit]


def _pooled(results: list[dict], name_of) -> dict:
    """Groups results by ``name_of(result)``; an error when a group's results differ in anything but the
    :data:`POOLED` seeds (their tags and the layer they were probed at), which a bar must not average."""
    groups: dict = {}
    for r in results:
        groups.setdefault(name_of(r), []).append(r)
    for name, members in groups.items():
        described = [
            {"layer": r.get("layer"), **{k: v for k, v in r.get("tag", {}).items() if k not in POOLED}} for r in members
        ]
        keys = sorted({k for d in described for k in d})
        differ = [k for k in keys if len({str(d.get(k)) for d in described}) > 1]
        if differ:
            raise ReportError(
                f"probe results {name!r} differ in {', '.join(differ)}, not only in a seed ({', '.join(POOLED)}): "
                "one bar cannot pool them; choose them with --probe-where KEY=VALUE"
            )
    return groups


def _original_bar(results: list[dict], value) -> Bar | None:
    originals = _pooled(_with_edit(results, "original"), lambda r: "original").get("original", [])
    values = [v for r in originals if (v := value(r["tasks"])) is not None]
    return _bar("original", values) if values else None


def ablation_bars(results: list[dict]) -> list[tuple[str, str, list[Bar]]]:
    """Panels (title, metric, bars) of the ablation figure: each task's metric (and the phone probe's
    accuracy per phone type) for the original model and each set of removed neurons, every bar pooled over
    the :data:`POOLED` seeds."""
    ablated = _with_edit(results, "ablated")
    groups = _pooled(ablated, lambda r: str(r["tag"].get("neurons", "?")) + _kind(r))
    readers = []  # (title, metric, value of a result's tasks or None)
    for task in dict.fromkeys(t for r in ablated for t in r["tasks"]):
        readers.append((task, _metric_name(task), lambda t, task=task: _value(t, task)))
        types = dict.fromkeys(n for r in ablated for n in r["tasks"].get(task, {}).get("accuracy_by_type", {}))
        for name in types:
            readers.append(
                (
                    f"{task}: {name}",
                    "accuracy",
                    lambda t, task=task, name=name: t.get(task, {}).get("accuracy_by_type", {}).get(name),
                )
            )
    panels = []
    for title, metric, value in readers:
        bars = [b] if (b := _original_bar(results, value)) else []
        for name, members in groups.items():
            if found := [v for r in members if (v := value(r["tasks"])) is not None]:
                bars.append(_bar(name, found))
        if bars:
            panels.append((title, metric, bars))
    return panels


def pruning_curves(results: list[dict]) -> dict[str, tuple[dict[str, list[tuple[float, Bar]]], Bar | None]]:
    """Per task: each pruning method's points (kept fraction, the metric pooled over the :data:`POOLED`
    seeds) in the order of the kept fraction, and the original model's bar."""
    pruned = [r for r in _with_edit(results, "pruned") if "keep" in r["tag"]]
    groups = _pooled(pruned, lambda r: (str(r["tag"].get("method", "?")) + _kind(r), float(r["tag"]["keep"])))
    curves = {}
    for task in dict.fromkeys(t for r in pruned for t in r["tasks"]):
        methods: dict[str, list[tuple[float, Bar]]] = {}
        for (method, keep), members in sorted(groups.items()):
            if found := [_value(r["tasks"], task) for r in members if task in r["tasks"]]:
                methods.setdefault(method, []).append((keep, _bar(f"{method}, {keep:g} kept", found)))
        curves[task] = (methods, _original_bar(results, lambda t, task=task: _value(t, task)))
    return curves


def _ablation(results: list[dict]) -> Figure | None:
    """Bars: :func:`ablation_bars`, pooled results as mean ± s.d. and named with their count."""
    panels = ablation_bars(results)
    if not panels:
        return None

    def draw(fig):
        for i, (title, ylabel, bars) in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), i + 1)
            names = [f"{b.name} (×{b.n})" if b.n > 1 else b.name for b in bars]
            means, errors = [b.mean for b in bars], [b.sd for b in bars]
            colours = ["#888" if b.name == "original" else "#c44" for b in bars]
            ax.bar(range(len(bars)), means, yerr=errors, color=colours, capsize=3)
            ax.set_xticks(range(len(bars)), names, rotation=70, ha="right", fontsize=6)
            low = min(m - e for m, e in zip(means, errors))
            high = max(m + e for m, e in zip(means, errors))
            pad = max(0.02, 0.15 * (high - low))
            ax.set_ylim(low - pad, high + pad)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(ylabel)

    size = (2.6 * len(panels) + 1, 4.6)
    return render_figure(draw, "probe_ablation", "Probes after removing neurons (pooled results: mean ± s.d.)", size)


def _pruning(results: list[dict]) -> Figure | None:
    """Curves: :func:`pruning_curves`, one line per pruning method (mean ± s.d. where results are pooled)."""
    curves = pruning_curves(results)
    if not curves:
        return None

    names = sorted({m for methods, _ in curves.values() for m in methods})
    colours = {m: f"C{i}" for i, m in enumerate(names)}  # one colour per method in every panel

    def draw(fig):
        for i, (task, (methods, original)) in enumerate(curves.items()):
            ax = fig.add_subplot(1, len(curves), i + 1)
            for method, points in methods.items():
                keep = [k for k, _ in points]
                ax.errorbar(
                    keep,
                    [b.mean for _, b in points],
                    yerr=[b.sd for _, b in points],
                    marker="o",
                    capsize=3,
                    label=method,
                    color=colours[method],
                )
            if original is not None:
                ax.axhline(original.mean, color="k", linestyle="--", linewidth=0.8, label="original")
                if original.sd:
                    ax.axhspan(original.mean - original.sd, original.mean + original.sd, color="k", alpha=0.08)
            ax.set_title(task)
            ax.set_xlabel("kept fraction")
            ax.set_ylabel(_metric_name(task))
            ax.invert_xaxis()
            ax.legend(fontsize=6)  # panels may hold different methods (the refitted probes are a few tasks')

    return render_figure(draw, "probe_pruning", "Probes after pruning (no retraining)", (3 * len(curves) + 1, 3.5))


def _probe_table(results: list[dict]) -> str:
    esc = html.escape
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    head = "".join(f"<th>{esc(t)} {_metric_name(t)}</th>" for t in tasks)
    rows = []
    for i, r in enumerate(results):
        tag = ", ".join(f"{k}={v}" for k, v in r.get("tag", {}).items()) or esc(str(r["model"]))
        cells = "".join(
            f'<td data-probe="{i}" data-task="{esc(t)}">'
            + (f"{_value(r['tasks'], t):.3f}" if t in r["tasks"] else "")
            + "</td>"
            for t in tasks
        )
        rows.append(f"<tr><th>{esc(tag)}</th>{cells}</tr>")
    return f'<table id="probes"><tr><th>model</th>{head}</tr>{"".join(rows)}</table>'


TITLE = "<title>neurostat report"
"""How a report's ``index.html`` begins its title: what marks a folder as a report that may be rewritten."""


def is_report(folder: Path) -> bool:
    """Whether ``folder`` holds a report written by :func:`build_report`."""
    return has_page(folder, TITLE)


def build_report(
    store: str | Path,
    out: str | Path,
    neuron_files: list[Path] | None = None,
    sigma: float = 0.8,
    probe: str | Path | None = None,
    probe_where: dict[str, str] | None = None,
    allow_other_model: bool = False,
) -> dict:
    """Writes the PNGs and ``index.html`` into ``out``; returns the numbers on the page and notes (neuron files
    are checked against the store's model: :func:`neurostat.select.property_sets`).  ``probe``:
    a probe-results JSON whose ablation and pruning entries become figures and a table (a note says so when
    it holds neither); ``probe_where``: only its results whose tags have these values (:func:`probe_results`).
    ``out`` must be new,
    empty or a report (:func:`neurostat.files.check_out_folder`), apart from the inputs."""
    out = check_out_folder(out, "report", is_report, (store, *(neuron_files or []), probe))
    stats = open_stats(store)
    if "topk_count" not in stats.ds:
        raise ReportError(
            f"{store} has no topk statistic (collected: {', '.join(stats.meta.stats)}); collect it with --stat topk"
        )
    try:
        sets = property_sets(stats, list(neuron_files or []), sigma, allow_other_model)
    except NeuronSetError as e:
        raise ReportError(str(e)) from None
    if not sets:
        raise ReportError(
            f"{store}: no property can be selected (label parts {', '.join(stats.parts)}); give --neurons FILE"
        )
    counts = {name: {n: s.counts().get(n, 0) for n in stats.layers} for name, s in sets.items()}
    regions = venn(sets) if len(sets) > 1 else {}
    figures = [_per_layer(stats, sets)]
    if regions:
        figures.append(_overlaps(sets, regions))
    figures += [f for name, s in sets.items() if (f := _heatmap(stats, name, s)) is not None]
    figures.append(_histograms(stats))
    results = probe_results(probe, probe_where) if probe else []
    edits = [f for f in (_ablation(results), _pruning(results)) if f is not None]
    figures += edits
    notes = []
    if results and not edits:
        tags = sorted({str(r.get("tag", {}).get("edit", "none")) for r in results})
        notes.append(
            f"{probe}: no ablated or pruned model among its results (edits: {', '.join(tags)}), so no ablation "
            "or pruning figure; probe the checkpoints `neurostat ablate` and `neurostat prune` wrote "
            "(`neurostat probe --compare`), whose records say what was done to them"
        )
    out.mkdir(parents=True, exist_ok=True)
    for f in figures:
        (out / f"{f.name}.png").write_bytes(f.png)
    probes = _probe_table(results) if results else ""
    probes += "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    (out / "index.html").write_text(_page(stats, counts, regions, figures, sigma, bool(neuron_files), probes))
    return {"counts": counts, "regions": regions, "figures": [f"{f.name}.png" for f in figures], "notes": notes}


def _page(stats: Stats, counts, regions, figures, sigma: float, from_files: bool, probes: str = "") -> str:
    m = stats.meta.model
    esc = html.escape
    source = "neuron files" if from_files else f"the paper's rule, σ = {sigma}, statistic topk"
    head = "".join(f"<th>{esc(stats.names[n])}</th>" for n in stats.layers)
    rows = "".join(
        f"<tr><th>{esc(name)}</th>"
        + "".join(f'<td data-property="{esc(name)}" data-layer="{n}">{c}</td>' for n, c in per.items())
        + f'<td data-property="{esc(name)}" data-layer="total">{sum(per.values())}</td></tr>'
        for name, per in counts.items()
    )
    overlap = "".join(
        f'<tr><td>{esc(key.replace("&", " ∩ "))}</td><td data-region="{esc(key)}">{n}</td></tr>'
        for key, n in sorted(regions.items(), key=lambda kv: -kv[1])
    )
    images = "".join(
        f'<figure><img alt="{esc(f.title)}" src="data:image/png;base64,{base64.b64encode(f.png).decode()}">'
        f"<figcaption>{esc(f.title)}</figcaption></figure>"
        for f in figures
    )
    p = stats.meta.progress
    ffns = f"{m['ffns_per_layer']} FFNs × " if m.get("ffns_per_layer", 1) > 1 else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{TITLE}: {esc(str(stats.path))}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>neurostat report</h1>
<p>Store <code>{esc(str(stats.path))}</code>: {esc(m["model"])} ({m["num_layers"]} layers × {ffns}{m["width"]} neurons),
{p.utterances_done} utterances, {p.tokens:,} tokens ({esc(stats.meta.statistics["tokens"])}),
k = {stats.k} (chance {stats.chance:.4f}). Property neurons from {esc(source)}.</p>
<h2>Property neurons per layer</h2>
<table id="counts"><tr><th>property</th>{head}<th>total</th></tr>{rows}</table>
<h2>Overlaps (exclusive regions, all layers)</h2>
<table id="overlaps"><tr><th>region</th><th>neurons</th></tr>{overlap}</table>
{"<h2>Probes</h2>" + probes if probes else ""}
<h2>Figures</h2>{images}
</body></html>
"""
