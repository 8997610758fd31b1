"""Property neurons from a statistics store (the paper's rule, user groups, and LAPE's entropy rule).

The paper's rule, for a property with groups g, each with a set of phones Φ_g: chance level
r = k/D; ``frac_g(j) = |{p ∈ Φ_g : P(j | g, p) > r}| / |Φ_g|`` (strict >); group neurons
``N_g = {j : frac_g(j) ≥ σ}``; property neurons are the neurons that are group neurons of exactly
one group.  A (group, phone) cell without tokens counts as not above chance and stays in the
denominator (the paper's behaviour); a warning names such cells.  Groups and cells may be labels of
any label part of the store — e.g. utterance clusters over k-means units, as in the follow-up paper.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from .choices import SELECTION_RULES, UNKNOWN_GENDER
from .errors import OptionError
from .files import atomic_write, check_out_folder
from .neuronset import NeuronModel, NeuronSet, NeuronSetError
from .phones import ARPABET, BROAD_CLASSES
from .stats import Stats

PROPERTIES = ("phone-type", "gender", "pitch", "phone")


class SelectionError(ValueError):
    """Groups or settings that cannot select anything; the message says why."""


@dataclass
class GroupSpec:
    """Groups over one label part ``axis``: each group lists labels of that part.

    A group's cells are (group, c) for each label c in ``cells`` of the part ``within`` (default: the
    39 phones when ``within`` is phone, else every label of ``within``); when ``within`` is ``axis``
    itself, a group's cells are its own labels (phone-type: each broad class over its phones).
    """

    axis: str
    groups: dict[str, list[str]]
    within: str = "phone"
    cells: list[str] | None = None

    @classmethod
    def builtin(cls, name: str, stats: Stats) -> "GroupSpec":
        """The paper's properties, or one group per label of an attached label set: an utterance-level set
        over the phones (like gender), a frame-level set over its own labels (like phone)."""
        space = stats.label_space
        if name == "phone-type":
            return cls("phone", {g: list(p) for g, p in BROAD_CLASSES.items()})
        if name == "phone":
            return cls("phone", {p: [p] for p in ARPABET})
        if name == "pitch":
            _need_part(stats, "pitch_bin")
            return cls("pitch_bin", {b: [b] for b in space.vocab("pitch_bin") if b != "unvoiced"})
        if name == "gender":
            return cls("gender", _gender_groups(stats), "phone" if "phone" in stats.parts else "gender")
        if name in stats.parts and name != "pitch_bin":
            within = "phone" if stats.level(name) == "utterance" and "phone" in stats.parts else name
            return cls(name, {v: [v] for v in space.vocab(name)}, within)
        extra = [p for p in stats.parts if p not in ("phone", "gender", "pitch_bin")]
        raise SelectionError(
            f"unknown property {name!r}; choose from {', '.join(PROPERTIES + tuple(extra))} or give --groups FILE"
        )

    @classmethod
    def load(cls, path: str | Path) -> "GroupSpec":
        """A JSON (or ``.yaml``/``.yml``) file ``{"axis": part, "groups": {"name": [labels]}, "within": part?,
        "cells": [labels]?}`` (``"phones"`` is read as ``"cells"`` over the phones)."""
        try:
            text = Path(path).read_text()
            raw = yaml.safe_load(text) if Path(path).suffix in (".yaml", ".yml") else json.loads(text)
            cells = raw.get("cells", raw.get("phones"))
            return cls(
                str(raw["axis"]),
                {str(k): [str(v) for v in labels] for k, labels in raw["groups"].items()},
                str(raw.get("within", "phone")),
                None if cells is None else [str(c) for c in cells],
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError) as e:
            raise SelectionError(
                f"{path}: not a group file ({e}); expected "
                '{"axis": "<label part>", "groups": {"name": [labels]}, "within": "<label part>", "cells": [labels]}'
            ) from None

    def cell_labels(self, stats: Stats) -> list[str] | None:
        """Labels of ``within`` that make a group's cells (None: each group's own labels)."""
        if self.within == self.axis:
            return None
        if self.cells is not None:
            return self.cells
        return list(ARPABET) if self.within == "phone" else list(stats.label_space.vocab(self.within))

    def check(self, stats: Stats) -> None:
        space = stats.label_space
        for part in (self.axis, self.within):
            _need_part(stats, part)
        if len(self.groups) < 1:
            raise SelectionError("no groups given")
        vocab = set(space.vocab(self.axis))
        for name, labels in self.groups.items():
            unknown = sorted(set(labels) - vocab)
            if unknown or not labels:
                raise SelectionError(
                    f"group {name!r}: labels {unknown or labels} are not {self.axis} labels of this store"
                )
        cells = self.cell_labels(stats)
        if cells is not None:
            unknown = sorted(set(cells) - set(space.vocab(self.within)))
            if unknown or not cells:
                raise SelectionError(f"cells {unknown or cells} are not {self.within} labels of this store")


def _gender_groups(stats: Stats) -> dict[str, list[str]]:
    """One group per speaker gender; the tokens of utterances whose corpus gives no gender are in none (a
    warning says how many), and a store where no token has a gender is refused, naming what the corpus lacks."""
    _need_part(stats, "gender")
    known = [g for g in stats.label_space.vocab("gender") if g != UNKNOWN_GENDER]
    if UNKNOWN_GENDER in stats.label_space.vocab("gender"):
        tokens = stats.tokens(by=("gender",))
        lacking = stats.meta.corpus.get("lacking", {}).get("gender", "its corpus gives no speaker gender")
        if not int(tokens.sel(gender=known).sum()):
            raise SelectionError(
                f"{stats.path}: no token has a speaker gender to group by: {lacking}; give the corpus genders "
                "(the manifest's gender column, the supervisions' gender), prepare and collect again"
            )
        warnings.warn(
            f"{int(tokens.sel(gender=UNKNOWN_GENDER))} tokens of utterances without a speaker gender are in no gender "
            f"group ({lacking})",
            stacklevel=3,
        )
    return {g: [g] for g in known}


def _need_part(stats: Stats, part: str) -> None:
    if part not in stats.parts:
        raise SelectionError(f"{stats.path} has no label part {part!r}; its parts are {', '.join(stats.parts)}")


@dataclass
class Selection:
    """Property neurons and the group neurons they come from."""

    property: str
    neurons: NeuronSet
    groups: dict[str, NeuronSet]
    settings: dict
    empty_cells: list[tuple[str, str]]


def cell_counts(stats: Stats, spec: GroupSpec, stat: str = "topk") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per group: (activation counts [layer, cells, neuron], tokens [cells]) of its (group, cell) cells."""
    spec.check(stats)
    cells = spec.cell_labels(stats)
    by = (spec.axis,) if cells is None else (spec.axis, spec.within)
    counts, tokens = stats.counts(stat, by=by), stats.tokens(by=by)
    out = {}
    for g, labels in spec.groups.items():
        if cells is None:
            out[g] = counts.sel({spec.axis: labels}).values, tokens.sel({spec.axis: labels}).values
        else:
            where = {spec.axis: labels, spec.within: cells}
            out[g] = counts.sel(where).sum(spec.axis).values, tokens.sel(where).sum(spec.axis).values
    return out


def _cell_names(spec: GroupSpec, stats: Stats, group: str) -> list[str]:
    cells = spec.cell_labels(stats)
    return spec.groups[group] if cells is None else cells


def _fragility(
    stats: Stats, spec: GroupSpec, tokens: dict[str, np.ndarray], sigma: float, min_tokens: int
) -> list[str]:
    """Warnings where the rule is fragile: empty cells, cells too small for the chance level (one top-k
    hit among fewer than D/k tokens is above chance), and groups whose σ cannot be reached."""
    small = int(np.ceil(1 / stats.chance))
    empty, tiny, unreachable, shrunk = [], [], [], []
    for g, n in tokens.items():
        kept = n >= min_tokens
        names = [c for c, k in zip(_cell_names(spec, stats, g), kept) if k]
        if min_tokens and kept.sum() <= max(2, len(kept) // 2) and kept.sum() < len(kept):
            shrunk.append(
                f"group {g}: --min-tokens {min_tokens} keeps {int(kept.sum())} of its {len(kept)} cells "
                f"({', '.join(names[:4]) or 'none'}{', ...' if len(names) > 4 else ''}): its neurons are decided by "
                f"{'those cells alone' if names else 'no cell'}"
            )
        n = n[kept]
        if (n == 0).any():
            gone = [c for c, m in zip(names, n) if m == 0]
            empty.append(
                f"group {g}: {len(gone)} of its {len(n)} cells ({', '.join(gone[:4])}{', ...' if len(gone) > 4 else ''})"
            )
        if ((n > 0) & (n < small)).any():
            tiny.append(f"group {g}: {int(((n > 0) & (n < small)).sum())} of its {len(n)} cells")
        reach = (n > 0).sum() / len(n) if len(n) else 0.0
        if reach < sigma:
            unreachable.append(
                f"group {g}: only {int((n > 0).sum())} of its {len(n)} cells have tokens, so its fraction reaches at "
                f"most {reach:.3f} < σ = {sigma}: it can have no group neurons"
            )
    messages = []
    if empty:
        messages.append(
            f"(group, {spec.within}) cells without tokens count as not above chance (the paper's rule): "
            + "; ".join(empty)
        )
    if tiny:
        messages.append(
            f"cells with fewer than D/k = {small} tokens, where a single top-k hit is above chance: "
            + "; ".join(tiny)
            + (" (--min-tokens N leaves such cells out of the denominator)" if not min_tokens else "")
        )
    return messages + unreachable + shrunk


def property_neurons(
    stats: Stats,
    property: str = "gender",
    sigma: float = 0.8,
    stat: str = "topk",
    groups: GroupSpec | str | Path | None = None,
    rule: str = "paper",
    entropy_quantile: float = 0.01,
    min_prob_quantile: float = 0.95,
    min_tokens: int = 0,
) -> Selection:
    """Selects the property neurons of ``property`` (a paper property or an attached label set), or of
    user ``groups`` (a :class:`GroupSpec` or its JSON file), from a store.

    ``min_tokens`` > 0 leaves (group, cell) cells with fewer tokens out of the group's denominator (a
    departure from the paper, which keeps every cell and counts an empty one as not above chance)."""
    if not 0 < sigma <= 1:
        raise SelectionError(f"sigma must be in (0, 1], got {sigma}")
    if rule not in SELECTION_RULES:
        raise SelectionError(f"unknown rule {rule!r}; choose from {SELECTION_RULES}")
    if min_tokens < 0:
        raise SelectionError(f"min_tokens must be >= 0, got {min_tokens}")
    spec = GroupSpec.load(groups) if isinstance(groups, (str, Path)) else groups or GroupSpec.builtin(property, stats)
    counts = cell_counts(stats, spec, stat)
    tokens = {g: n for g, (_, n) in counts.items()}
    kept = {g: n >= min_tokens for g, n in tokens.items()}
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = {g: c[:, kept[g]] / np.where(n > 0, n, np.nan)[kept[g]][None, :, None] for g, (c, n) in counts.items()}
    empty = [
        (g, cell)
        for g, n in tokens.items()
        for cell, m, k in zip(_cell_names(spec, stats, g), n, kept[g])
        if k and m == 0
    ]
    for message in _fragility(stats, spec, tokens, sigma, min_tokens):
        warnings.warn(message, stacklevel=2)
    if rule == "paper" and stat != "topk":
        warnings.warn(
            f"the paper's rule compares each P(j | cell) with the top-k chance level r = k/D = {stats.chance:.4f}, "
            f"a level made for --stat topk (every token activates k of D neurons); P from --stat {stat} is of "
            "another scale, so most neurons pass it: use --rule entropy with it, or --stat topk",
            stacklevel=2,
        )
    geometry = dict(num_layers=None, width=stats.width)
    layers = stats.layers
    if rule == "paper":  # a group without cells (all left out by min_tokens) reaches no fraction
        chance = stats.chance
        member = {
            g: (np.nan_to_num(p, nan=-1.0) > chance).sum(1) / max(p.shape[1], 1) >= sigma for g, p in probs.items()
        }
    else:
        member = _entropy_members(probs, entropy_quantile, min_prob_quantile)
    group_sets = {
        g: NeuronSet({layers[i]: np.flatnonzero(m[i]) for i in range(len(layers))}, **geometry)
        for g, m in member.items()
    }
    hits = sum(m.astype(int) for m in member.values())
    exclusive = NeuronSet({layers[i]: np.flatnonzero(hits[i] == 1) for i in range(len(layers))}, **geometry)
    settings = {
        "rule": rule,
        "sigma": sigma,
        "stat": stat,
        "chance": stats.chance,
        "min_tokens": min_tokens,
        "axis": spec.axis,
        "within": spec.within,
        "groups": spec.groups,
        "store": str(stats.path),
        "model": NeuronModel.of_store(stats.meta.model).to_dict(),
    }
    if groups is None:
        name = property
    else:
        name = str(groups) if isinstance(groups, (str, Path)) else f"{spec.axis} groups"
    return Selection(name, exclusive, group_sets, settings, empty)


def _entropy_members(
    probs: dict[str, np.ndarray], entropy_quantile: float, min_prob_quantile: float
) -> dict[str, np.ndarray]:
    """LAPE: pool each group's cells, normalise P over groups, keep neurons of low entropy among those
    whose largest P is high; each kept neuron belongs to the groups where P exceeds its mean."""
    names = list(probs)
    if len(names) < 2:
        raise SelectionError("the entropy rule needs at least two groups")
    pooled = np.stack([np.nanmean(probs[g], axis=1) for g in names])  # [G, layer, neuron]
    pooled = np.nan_to_num(pooled)
    total = pooled.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = pooled / total
        entropy = -np.nansum(np.where(q > 0, q * np.log(q), 0.0), axis=0)
    strong = pooled.max(0) >= np.quantile(pooled.max(0), min_prob_quantile)
    candidates = strong & (total > 0)
    if not candidates.any():
        return {g: np.zeros_like(candidates) for g in names}
    keep = candidates & (entropy <= np.quantile(entropy[candidates], entropy_quantile))
    above = pooled > pooled.mean(0, keepdims=True)
    return {g: keep & above[i] for i, g in enumerate(names)}


def venn(sets: dict[str, NeuronSet]) -> dict[str, int]:
    """Sizes of the exclusive regions of any number of sets (summed over layers): each key names the
    sets a region belongs to, e.g. ``gender&pitch`` holds the neurons in both and in no other."""
    names = list(sets)
    layers = sorted({n for s in sets.values() for n in s.layers})
    regions: dict[str, int] = {}
    for layer in layers:
        every = set().union(*(sets[name][layer] for name in names))
        for j in every:
            key = "&".join(name for name in names if j in sets[name][layer])
            regions[key] = regions.get(key, 0) + 1
    return regions


def select_properties(
    stats: Stats,
    properties: tuple[str, ...] = ("gender",),
    groups: str | Path | None = None,
    **settings,
) -> tuple[dict[str, Selection], list[str]]:
    """:func:`property_neurons` for each property (or for the ``groups`` file alone), keyed by name,
    and the warnings they raised, each prefixed with its property."""
    names = [str(groups)] if groups else list(properties or ("gender",))
    selections, messages = {}, []
    for name in names:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            selections[name] = property_neurons(stats, name, groups=groups, **settings)
        messages += [f"warning ({name}): {w.message}" for w in caught]
    return selections, messages


def has_labels(stats: Stats, prop: str) -> bool:
    """Whether the store has the label parts a built-in property's groups need."""
    try:
        GroupSpec.builtin(prop, stats).check(stats)
    except SelectionError:
        return False
    return True


def property_sets(
    stats: Stats, neuron_files: list[Path], sigma: float, allow_other_model: bool = False
) -> dict[str, NeuronSet]:
    """The neuron sets a report or a browser shows: each file (named by its stem), checked against the
    store's model (its geometry, and the model its settings file records unless ``allow_other_model``);
    without files, the paper's properties the store has labels for, selected with σ."""
    if neuron_files:
        model = NeuronModel.of_store(stats.meta.model)
        sets = {}
        for path in neuron_files:
            try:
                sets[Path(path).stem] = NeuronSet.load(path, model=model, allow_other_model=allow_other_model)
            except NeuronSetError as e:
                raise NeuronSetError(f"{e} (the store's model: {model.describe()})") from None
        return sets
    usable = [p for p in PROPERTIES if p != "phone" and has_labels(stats, p)]
    selections, _ = select_properties(stats, tuple(usable), sigma=sigma)
    return {name: sel.neurons for name, sel in selections.items()}


def is_selection_folder(folder: Path) -> bool:
    """Whether ``folder`` holds only what :func:`save_selections` writes: neuron files and their settings."""
    children = list(folder.iterdir())
    return any(c.name.endswith(".settings.json") for c in children) and all(
        c.is_file() and c.suffix == ".json" for c in children
    )


def save_selections(selections: dict[str, Selection], out: str | Path, store: str | Path | None = None) -> str:
    """To the file ``out`` when it ends in ``.json`` (one selection), else to ``out/<name>.json`` — the
    same kind of output whatever the number of properties.  Each neuron file keeps the paper's format;
    the settings that chose it (σ, rule, statistic, min tokens, groups, store) go beside it in
    ``<stem>.settings.json``.  A folder ``out`` must be new, empty or such a folder, apart from ``store``
    (:func:`neurostat.files.check_out_folder`).  Returns what was written."""
    out = Path(out)
    if out.suffix.lower() == ".json" and len(selections) > 1:
        raise OptionError(f"--out {out} is one file but {len(selections)} properties were selected; give a folder")
    if out.suffix.lower() == ".json":
        out.parent.mkdir(parents=True, exist_ok=True)
        files = {out: next(iter(selections.values()))}
    else:
        check_out_folder(out, "folder of neuron files", is_selection_folder, (store,))
        out.mkdir(parents=True, exist_ok=True)
        files = {out / f"{name}.json": sel for name, sel in selections.items()}
    for path, sel in files.items():
        sel.neurons.save(path)
        settings = {"property": sel.property, **sel.settings, "empty_cells": [list(c) for c in sel.empty_cells]}
        atomic_write(path.with_suffix(".settings.json"), json.dumps(settings, indent=1))
    names = ", ".join(p.name for p in files)
    return f"wrote {names} and beside {'it' if len(files) == 1 else 'each'} its settings (.settings.json) to {out.parent if out.suffix.lower() == '.json' else out}"


def describe_selections(stats: Stats, selections: dict[str, Selection], max_groups: int = 16) -> str:
    """Per-layer counts of each selection's property neurons and group neurons, and their overlaps."""
    first = next(iter(selections.values())).settings
    layers = stats.layers
    lines = [
        f"{stats.path}: r = k/D = {stats.chance:.4f}, σ = {first['sigma']}, statistic {first['stat']}, rule {first['rule']}"
        + (
            f", min tokens {first['min_tokens']} (cells with fewer left out: not the paper's rule)"
            if first.get("min_tokens")
            else ""
        ),
    ]
    shown = {name: list(sel.groups.items())[:max_groups] for name, sel in selections.items()}
    width = max(
        [5] + [len(name) for name in selections] + [len(f"  N[{g}]") for groups in shown.values() for g, _ in groups]
    )
    col = max(5, *(len(stats.names[n]) for n in layers))  # a Conformer's entries are named 3.ffn1, 3.ffn2
    lines.append("layer".ljust(width) + " " + " ".join(f"{stats.names[n]:>{col}}" for n in layers) + "   total")
    for name, sel in selections.items():
        counts = sel.neurons.counts()
        row = " ".join(f"{counts[n]:>{col}}" for n in layers)
        lines.append(name.ljust(width) + " " + row + f"   {len(sel.neurons)}")
        for g, group in shown[name]:
            row = " ".join(f"{group.counts()[n]:>{col}}" for n in layers)
            lines.append(f"  N[{g}]".ljust(width) + " " + row + f"   {len(group)}")
        if len(sel.groups) > max_groups:
            lines.append(f"  ... and {len(sel.groups) - max_groups} more groups (neurostat.select in Python has all)")
    if len(selections) > 1:
        regions = {k: v for k, v in venn({n: s.neurons for n, s in selections.items()}).items() if v}
        lines.append(
            "overlaps (exclusive regions, all layers): "
            + (", ".join(f"{k} {v}" for k, v in sorted(regions.items())) or "none: no property has a neuron")
        )
    return "\n".join(lines)
