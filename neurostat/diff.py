"""``neurostat diff``: what changed between two stores over the same corpus and label space (two models of
one geometry, or one model before and after an edit).

Per layer and property: the property neurons (the paper's rule, σ) gained, lost and kept from store A to
store B.  Per (layer, label, neuron) cell: a two-sided two-proportion z-test of P(j | label) = top-k count /
tokens in A against B, with the pooled variance; cells without tokens in A or in B are not tested, and the
p-values of all tested cells are corrected together by Benjamini–Hochberg (false discovery rate ≤ α).

A neuron is the same neuron in both stores by its index in the original model: a pruned model's store records
that index for each neuron it kept (``original_neuron``), so ``diff original.zarr pruned.zarr`` compares the
neurons pruning kept — what pruning did to them — and names them by their original index.

>>> d = diff_stores("a.zarr", "b.zarr", out="diff/")   # diff/index.html, diff/diff.json, PNGs
>>> d.properties["gender"].gained                       # {layer: [neuron indices (original ones)]}
"""

from __future__ import annotations

import base64
import html
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .files import atomic_write, check_out_folder, has_page
from .report import Figure, render_figure
from .select import PROPERTIES, GroupSpec, has_labels, select_properties
from .stats import Stats, open_stats
from .store import fingerprint_differences

TEST = (
    "two-sided two-proportion z-test per (layer, label, neuron) cell of P(j | label) = top-k count / tokens, "
    "pooled variance; cells without tokens in A or in B untested"
)
CORRECTION = "Benjamini-Hochberg false discovery rate over all tested cells"
TITLE = "<title>neurostat diff"
"""How a diff page's ``index.html`` begins its title: what marks a folder as a diff that may be rewritten."""


class DiffError(UserError):
    """Two stores that cannot be compared; the message names them and what differs."""


@dataclass
class CellChange:
    """One tested cell: its counts in A and B, the z statistic, p-value and BH-adjusted q-value."""

    layer: int
    label: dict[str, str]
    neuron: int
    count_a: int
    tokens_a: int
    count_b: int
    tokens_b: int
    z: float
    p: float
    q: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CellChange:
        return cls(**d)


@dataclass
class PropertyChange:
    """Property neurons per layer: gained (in B only) and lost (in A only) indices, and how many both have."""

    gained: dict[int, list[int]]
    lost: dict[int, list[int]]
    kept: dict[int, int]

    def to_dict(self) -> dict:
        return {k: {str(n): v for n, v in getattr(self, k).items()} for k in ("gained", "lost", "kept")}

    @classmethod
    def from_dict(cls, d: dict) -> PropertyChange:
        return cls(**{k: {int(n): v for n, v in d[k].items()} for k in ("gained", "lost", "kept")})


@dataclass
class StoreDiff:
    """The result of :func:`diff_stores` (``diff.json``)."""

    a: str
    b: str
    by: list[str]
    alpha: float
    sigma: float
    layers: list[int]
    tested: int
    significant: int
    changed_neurons: dict[int, int]  # per layer: neurons with at least one significant cell
    properties: dict[str, PropertyChange]
    top: list[CellChange]  # the significant cells of smallest q (largest |z| among ties)
    warnings: list[str] = field(default_factory=list)
    summed_out: dict[str, list[str]] = field(default_factory=dict)  # per store: label parts the other lacks
    test: str = TEST
    correction: str = CORRECTION
    names: list[str] = field(default_factory=list)  # each layer entry's name (3, or 3.ffn1 and 3.ffn2)
    compared: dict[int, int] = field(default_factory=dict)  # per layer: neurons both stores have (all, unpruned)

    def name(self, layer: int) -> str:
        """The name of the layer-axis entry ``layer`` (its number in diffs written before the names)."""
        return self.names[self.layers.index(layer)] if self.names else str(layer)

    @property
    def empty(self) -> bool:
        """No significant cell and no property neuron gained or lost."""
        return self.significant == 0 and not any(
            v for p in self.properties.values() for v in (*p.gained.values(), *p.lost.values())
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["changed_neurons"] = {str(n): c for n, c in self.changed_neurons.items()}
        out["compared"] = {str(n): c for n, c in self.compared.items()}
        out["properties"] = {name: p.to_dict() for name, p in self.properties.items()}
        out["top"] = [c.to_dict() for c in self.top]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> StoreDiff:
        return cls(
            **{
                **d,
                "changed_neurons": {int(n): c for n, c in d["changed_neurons"].items()},
                "compared": {int(n): c for n, c in d.get("compared", {}).items()},
                "properties": {name: PropertyChange.from_dict(p) for name, p in d["properties"].items()},
                "top": [CellChange.from_dict(c) for c in d["top"]],
            }
        )

    def describe(self) -> str:
        """Readable summary: the test, per property and layer the neurons gained/lost/kept, changed neurons."""
        col = max(5, *(len(self.name(n)) for n in self.layers))
        head = " ".join(f"{self.name(n):>{col}}" for n in self.layers)
        lines = [f"A = {self.a}, B = {self.b}"]
        if any(self.summed_out.values()):
            lines.append(
                "compared over the label parts both stores count; summed out, as only one store counts them: "
                + "; ".join(f"{s}'s {', '.join(parts)}" for s, parts in self.summed_out.items() if parts)
            )
        lines += [
            f"{self.tested:,} cells (layer × {' × '.join(self.by)} × neuron) tested: {self.test}; "
            f"{CORRECTION} at α = {self.alpha}: {self.significant:,} significant",
            f"{'layer':<22}{head}   total",
            *(
                [f"{'neurons compared':<22}" + " ".join(f"{self.compared[n]:>{col}}" for n in self.layers)]
                + [f"{'':<22}(the neurons both stores have, by their index in the original model)"]
                if self.compared
                else []
            ),
            f"{'changed neurons':<22}"
            + " ".join(f"{self.changed_neurons[n]:>{col}}" for n in self.layers)
            + f"   {sum(self.changed_neurons.values())}",
        ]
        for name, p in self.properties.items():
            for kind, per in (("gained", p.gained), ("lost", p.lost)):
                counts = [len(per[n]) for n in self.layers]
                lines.append(f"{name + ' ' + kind:<22}" + " ".join(f"{c:>{col}}" for c in counts) + f"   {sum(counts)}")
            lines.append(
                f"{name + ' kept':<22}"
                + " ".join(f"{p.kept[n]:>{col}}" for n in self.layers)
                + f"   {sum(p.kept.values())}"
            )
        if self.empty:
            lines.append("no change: no significant cell and no property neuron gained or lost")
        return "\n".join(lines)


def two_proportion_test(
    count_a: np.ndarray, tokens_a: np.ndarray, count_b: np.ndarray, tokens_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(z, two-sided p) of P_B − P_A in float64, with the pooled proportion p̂ = (c_A + c_B) / (n_A + n_B):
    z = (c_B/n_B − c_A/n_A) / sqrt(p̂ (1 − p̂) (1/n_A + 1/n_B)), p = erfc(|z| / √2).  Both tokens must be
    positive; a cell whose pooled p̂ is 0 or 1 (no variance) has z = 0, p = 1."""
    import torch

    ca, na, cb, nb = (np.asarray(x, dtype=np.float64) for x in (count_a, tokens_a, count_b, tokens_b))
    pooled = (ca + cb) / (na + nb)
    se = np.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(se > 0, (cb / nb - ca / na) / se, 0.0)
    p = torch.special.erfc(torch.from_numpy(np.abs(z) / np.sqrt(2.0))).numpy()
    return z, p


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """BH-adjusted q-values of a flat array of p-values: q_(i) = min over j ≥ i of p_(j) m / j, at most 1."""
    order = np.argsort(p, kind="stable")
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    q = np.empty_like(ranked)
    q[order] = np.minimum(np.minimum.accumulate(ranked[::-1])[::-1], 1.0)
    return q


def shared_parts(a: Stats, b: Stats) -> tuple[str, ...]:
    """The label parts both stores count (in A's order); a diff compares over them and sums out the others.
    None in common is a :class:`DiffError` naming each store's parts and how to collect comparable ones."""
    shared = tuple(part for part in a.parts if part in b.parts)
    if not shared:
        raise DiffError(
            f"A = {a.path} counts the label parts {', '.join(a.parts)} and B = {b.path} {', '.join(b.parts)}: none "
            f"in common; collect both with the same --labels (e.g. --labels {','.join(a.parts)})"
        )
    return shared


def check_comparable(a: Stats, b: Stats) -> list[str]:
    """Raises :class:`DiffError` when the stores count different corpora, different vocabularies of a label
    part both have, no label part in common, other layers or widths, or lack the top-k statistic; returns
    a note naming each statistic setting that differs.  Label parts only one store counts are not compared
    (:func:`diff_stores` sums them out)."""
    shared = shared_parts(a, b)
    fa, fb = a.meta.fingerprint.get("corpus_content"), b.meta.fingerprint.get("corpus_content")
    if fa is not None and fb is not None:
        own = {f"{part} labels" for part in (*a.parts, *b.parts) if part not in shared}  # one store's parts only
        fa, fb = ({k: v for k, v in f.items() if k not in own} for f in (fa, fb))
        corpus = fingerprint_differences({"corpus_content": fa}, {"corpus_content": fb}, "A", "B")
    else:
        corpus = [
            f"corpus {key}: A {a.meta.corpus.get(key)!r}, B {b.meta.corpus.get(key)!r}"
            for key in ("root", "subset", "utterances")
            if a.meta.corpus.get(key) != b.meta.corpus.get(key)
        ]
        if "utterance" in a.ds.coords and "utterance" in b.ds.coords:
            if list(a.ds["utterance"].values) != list(b.ds["utterance"].values):
                corpus.append("their utterance ids differ")
    if corpus:
        raise DiffError(
            f"A = {a.path} and B = {b.path} count different corpora ({'; '.join(corpus)}): diff compares two "
            "stores over the same corpus"
        )
    labels = [
        f"{part}: A {list(a.meta.labels[part])}, B {list(b.meta.labels[part])}"
        for part in shared
        if a.meta.labels[part] != b.meta.labels[part]
    ]
    if labels:
        raise DiffError(
            f"A = {a.path} and B = {b.path} have different label vocabularies ({'; '.join(labels)}): diff compares "
            "two stores over the same labels"
        )
    pruned = [s for s in (a, b) if "original_neuron" in s.ds.coords]
    if a.layers != b.layers or (a.width != b.width and not pruned):
        raise DiffError(
            f"A = {a.path} has layers {a.layers} × {a.width} neurons, B = {b.path} layers {b.layers} × {b.width}: "
            "diff compares models of the same geometry, or a model and a pruned copy of it"
        )
    for s in (a, b):
        if "topk_count" not in s.ds:
            raise DiffError(f"{s.path} has no topk statistic (collected: {', '.join(s.meta.stats)}); collect it")
    notes = []
    sources = {s.meta.model.get("pruned_from") or s.meta.model["model"] for s in (a, b)}
    if pruned and len(sources) > 1:
        notes.append(f"A and B come from different models ({', '.join(sorted(sources))}): neurons are matched by index")
    return notes + _setting_notes(a, b)


def _setting_notes(a: Stats, b: Stats) -> list[str]:
    """A warning naming each statistic setting that differs (a pruned model's k follows its width: not named)."""
    keys = ("tokens", "topk_ratio", "drop_final_run") + (() if a.width != b.width else ("k",))
    settings = [
        f"{key} A {a.meta.statistics.get(key)!r}, B {b.meta.statistics.get(key)!r}"
        for key in keys
        if a.meta.statistics.get(key) != b.meta.statistics.get(key)
    ]
    return [f"the stores were collected with different settings: {'; '.join(settings)}"] if settings else []


@dataclass(frozen=True)
class _Alignment:
    """The neurons both stores have, per layer (position in ``layers``): their index in the original model and
    their positions in A's and in B's neuron axis, ascending by that index."""

    original: list[np.ndarray]
    a: list[np.ndarray]
    b: list[np.ndarray]

    @classmethod
    def of(cls, sa: Stats, sb: Stats) -> _Alignment:
        out = [np.intersect1d(sa.original_neurons(n), sb.original_neurons(n), return_indices=True) for n in sa.layers]
        return cls([o for o, _, _ in out], [a for _, a, _ in out], [b for _, _, b in out])

    def original_set(self, stats: Stats, neurons) -> dict[int, set[int]]:
        """A store's neuron set as original indices, restricted to the neurons both stores have."""
        common = dict(zip(stats.layers, self.original))
        return {
            n: set(stats.original_neurons(n)[sorted(neurons[n])].tolist()) & set(common[n].tolist())
            for n in stats.layers
        }


def diff_stores(
    a: str | Path,
    b: str | Path,
    out: str | Path | None = None,
    properties: tuple[str, ...] = (),
    sigma: float = 0.8,
    alpha: float = 0.05,
    by: tuple[str, ...] = (),
    top: int = 50,
) -> StoreDiff:
    """Compares store ``b`` with store ``a`` (see the module docstring); ``properties``: default the paper's
    properties the stores have labels for; ``by``: the label parts of the tested cells (default all, the
    joint label).  With ``out`` (new, empty or a diff page: :func:`neurostat.files.check_out_folder`) writes
    ``index.html``, one PNG per property and ``diff.json``.  Statistic settings that differ are a warning."""
    if not 0 < alpha < 1:
        raise DiffError(f"alpha must be in (0, 1), got {alpha}")
    if out is not None:
        out = check_out_folder(out, "diff page", is_diff_page, (a, b))
    sa, sb = open_stats(a), open_stats(b)
    notes = check_comparable(sa, sb)
    pruned = any("original_neuron" in s.ds.coords for s in (sa, sb))
    for note in notes:
        warnings.warn(note, stacklevel=2)
    shared = shared_parts(sa, sb)
    by = tuple(by) or shared
    outside = [part for part in by if part not in shared]
    if outside:
        raise DiffError(f"--by {','.join(outside)}: not a label part of both stores (both count {', '.join(shared)})")
    labels = [list(sa.label_space.vocab(p)) for p in by]
    align = _Alignment.of(sa, sb)
    ca, cb = (s.counts("topk", by).values.reshape(len(sa.layers), -1, s.width) for s in (sa, sb))
    na, nb = (s.tokens(by).values.reshape(-1) for s in (sa, sb))
    tested = (na > 0) & (nb > 0)
    label_ids = np.flatnonzero(tested)
    tests = [
        two_proportion_test(ca[i][tested][:, ia], na[tested, None], cb[i][tested][:, ib], nb[tested, None])
        for i, (ia, ib) in enumerate(zip(align.a, align.b))
    ]
    p_all = np.concatenate([p.ravel() for _, p in tests]) if tests else np.zeros(0)
    q_all = benjamini_hochberg(p_all)
    bounds = np.cumsum([0] + [p.size for _, p in tests])
    qs = [q_all[lo:hi].reshape(p.shape) for (lo, hi), (_, p) in zip(zip(bounds[:-1], bounds[1:]), tests)]
    significant = [q <= alpha for q in qs]
    found = [(i, *np.nonzero(sig)) for i, sig in enumerate(significant)]  # (layer, tested label, neuron) positions
    at = tuple(np.concatenate(c) for c in zip(*((np.full(t.size, i), t, j) for i, t, j in found)))
    q_sig = np.concatenate([qs[i][t, j] for i, t, j in found])
    z_sig = np.concatenate([np.abs(tests[i][0][t, j]) for i, t, j in found])
    order = np.lexsort((at[2], at[1], at[0], -z_sig, q_sig))[:top]  # smallest q first, then largest |z|
    shape = [len(v) for v in labels]
    changes = []
    for i, t, j in zip(*(a[order] for a in at)):
        label, (z, p) = label_ids[t], tests[i]
        joint = np.unravel_index(label, shape)
        changes.append(
            CellChange(
                layer=sa.layers[i],
                label={part: labels[k][joint[k]] for k, part in enumerate(by)},
                neuron=int(align.original[i][j]),
                count_a=int(ca[i, label, align.a[i][j]]),
                tokens_a=int(na[label]),
                count_b=int(cb[i, label, align.b[i][j]]),
                tokens_b=int(nb[label]),
                z=float(z[t, j]),
                p=float(p[t, j]),
                q=float(qs[i][t, j]),
            )
        )
    names = properties or tuple(p for p in PROPERTIES if p != "phone" and has_labels(sa, p))
    sets_a, msg_a = select_properties(sa, names, sigma=sigma)
    sets_b, msg_b = select_properties(sb, names, sigma=sigma)
    notes += [f"in {s} {m.removeprefix('warning ')}" for s, msgs in (("A", msg_a), ("B", msg_b)) for m in msgs]
    changed = {}
    for name in names:
        in_a, in_b = align.original_set(sa, sets_a[name].neurons), align.original_set(sb, sets_b[name].neurons)
        changed[name] = PropertyChange(
            {n: sorted(in_b[n] - in_a[n]) for n in sa.layers},
            {n: sorted(in_a[n] - in_b[n]) for n in sa.layers},
            {n: len(in_a[n] & in_b[n]) for n in sa.layers},
        )
    result = StoreDiff(
        a=str(a),
        b=str(b),
        by=list(by),
        alpha=alpha,
        sigma=sigma,
        layers=sa.layers,
        names=[sa.names[n] for n in sa.layers],
        tested=int(p_all.size),
        significant=int(sum(int(sig.sum()) for sig in significant)),
        changed_neurons={n: int(significant[i].any(axis=0).sum()) for i, n in enumerate(sa.layers)},
        compared={n: len(o) for n, o in zip(sa.layers, align.original)} if pruned else {},
        properties=changed,
        top=changes,
        warnings=notes,
        summed_out={name: [part for part in s.parts if part not in shared] for name, s in (("A", sa), ("B", sb))},
    )
    if out is not None:
        _write_page(result, sa, sb, align, Path(out))
    return result


def is_diff_page(folder: Path) -> bool:
    """Whether ``folder`` holds a page written by :func:`diff_stores`."""
    return has_page(folder, TITLE)


def _group_probability(stats: Stats, name: str) -> dict[str, np.ndarray]:
    """P(j | group) [layer, neuron] of each group of a built-in property (pooled over the group's labels)."""
    spec = GroupSpec.builtin(name, stats)
    counts, tokens = stats.counts("topk", (spec.axis,)), stats.tokens((spec.axis,))
    out = {}
    for group, members in spec.groups.items():
        n = float(tokens.sel({spec.axis: members}).values.sum())
        if n:
            out[group] = counts.sel({spec.axis: members}).values.sum(axis=1) / n
    return out


def _property_figure(d: StoreDiff, name: str, sa: Stats, sb: Stats, align: _Alignment) -> Figure:
    change = d.properties[name]

    def aligned(prob: dict[str, np.ndarray], at: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {g: np.concatenate([v[i, idx] for i, idx in enumerate(at)]) for g, v in prob.items()}

    pa, pb = aligned(_group_probability(sa, name), align.a), aligned(_group_probability(sb, name), align.b)

    def draw(fig):
        left, right = fig.subplots(1, 2)
        gained = [len(change.gained[n]) for n in d.layers]
        lost = [-len(change.lost[n]) for n in d.layers]
        left.bar(d.layers, gained, color="#55a868", label="gained (B only)")
        left.bar(d.layers, lost, color="#c44e52", label="lost (A only)")
        left.axhline(0, color="black", linewidth=0.8)
        left.set_xticks(d.layers, [d.name(n) for n in d.layers])
        left.set_xlabel("layer")
        left.set_ylabel("property neurons")
        left.legend(fontsize=8)
        for group in pa.keys() & pb.keys():
            right.scatter(pa[group].ravel(), pb[group].ravel(), s=3, alpha=0.4, label=group)
        high = max([float(np.max(v)) for v in (*pa.values(), *pb.values())] + [sa.chance * 2])
        right.plot([0, high], [0, high], color="black", linewidth=0.8, linestyle=":")
        right.set_xlabel("P(j | group) in A")
        right.set_ylabel("P(j | group) in B")
        right.legend(fontsize=8, markerscale=3)

    return render_figure(
        draw, f"diff_{name}", f"{name}: property neurons gained/lost per layer; P(j | group), A vs B", (11, 4)
    )


def _write_page(d: StoreDiff, sa: Stats, sb: Stats, align: _Alignment, out: Path) -> None:
    figures = [_property_figure(d, name, sa, sb, align) for name in d.properties]
    out.mkdir(parents=True, exist_ok=True)
    for f in figures:
        (out / f"{f.name}.png").write_bytes(f.png)
    atomic_write(out / "diff.json", json.dumps(d.to_dict(), indent=1))
    esc = html.escape
    head = "".join(f"<th>{esc(d.name(n))}</th>" for n in d.layers)

    def row(title: str, values: list[int], attrs: str) -> str:
        cells = "".join(f'<td {attrs} data-layer="{n}">{v}</td>' for n, v in zip(d.layers, values))
        return f"<tr><th>{esc(title)}</th>{cells}<td>{sum(values)}</td></tr>"

    rows = [row("neurons compared", [d.compared[n] for n in d.layers], 'data-kind="compared"')] if d.compared else []
    rows.append(row("changed neurons", [d.changed_neurons[n] for n in d.layers], 'data-kind="changed"'))
    for name, p in d.properties.items():
        for kind, values in (
            ("gained", [len(p.gained[n]) for n in d.layers]),
            ("lost", [len(p.lost[n]) for n in d.layers]),
            ("kept", [p.kept[n] for n in d.layers]),
        ):
            rows.append(row(f"{name} {kind}", values, f'data-property="{esc(name)}" data-kind="{kind}"'))
    cells = "".join(
        f"<tr><td>{esc(d.name(c.layer))}</td><td>{esc(', '.join(c.label.values()))}</td><td>{c.neuron}</td>"
        f"<td>{c.count_a}/{c.tokens_a}</td><td>{c.count_b}/{c.tokens_b}</td><td>{c.z:.2f}</td><td>{c.q:.2e}</td></tr>"
        for c in d.top
    )
    notes = "".join(f"<p class=note>{esc(n)}</p>" for n in d.warnings)
    images = "".join(
        f'<figure><img alt="{esc(f.title)}" src="data:image/png;base64,{base64.b64encode(f.png).decode()}">'
        f"<figcaption>{esc(f.title)}</figcaption></figure>"
        for f in figures
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{TITLE}: {esc(d.a)} vs {esc(d.b)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>neurostat diff</h1>
<p>A = <code>{esc(d.a)}</code> ({esc(sa.meta.model["model"])}), B = <code>{esc(d.b)}</code>
({esc(sb.meta.model["model"])}). Property neurons by the paper's rule, σ = {d.sigma}. Cells
(layer × {esc(" × ".join(d.by))} × neuron): {esc(d.test)}; {esc(d.correction)} at α = {d.alpha}:
{d.significant:,} of {d.tested:,} cells significant.</p>{notes}
<h2>Per layer</h2>
<table id="counts"><tr><th></th>{head}<th>total</th></tr>{"".join(rows)}</table>
<h2>Most significant cells</h2>
<table id="cells"><tr><th>layer</th><th>label</th><th>neuron</th><th>A</th><th>B</th><th>z</th><th>q</th></tr>{cells}</table>
<h2>Figures</h2>{images}
</body></html>
"""
    (out / "index.html").write_text(page)
