"""Property neurons from a statistics store (the paper's rule, user groups, and LAPE's entropy rule).

The paper's rule, for a property with groups g, each with a set of phones Φ_g: chance level
r = k/D; ``frac_g(j) = |{p ∈ Φ_g : P(j | g, p) > r}| / |Φ_g|`` (strict >); group neurons
``N_g = {j : frac_g(j) ≥ σ}``; property neurons are the neurons that are group neurons of exactly
one group.  A (group, phone) cell without tokens counts as not above chance and stays in the
denominator (the paper's behaviour); a warning names such cells.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .neuronset import NeuronSet
from .phones import ARPABET, BROAD_CLASSES
from .stats import Stats

PROPERTIES = ("phone-type", "gender", "pitch", "phone")
RULES = ("paper", "entropy")


class SelectionError(ValueError):
    """Groups or settings that cannot select anything; the message says why."""


@dataclass
class GroupSpec:
    """Groups over one label axis: ``axis`` is phone, gender or pitch_bin; each group lists labels of
    that axis; for a gender/pitch_bin axis the cells are (group, p) for p in ``phones``."""

    axis: str
    groups: dict[str, list[str]]
    phones: list[str] = field(default_factory=lambda: list(ARPABET))

    @classmethod
    def builtin(cls, name: str, stats: Stats) -> "GroupSpec":
        space = stats.label_space
        if name == "phone-type":
            return cls("phone", {g: list(p) for g, p in BROAD_CLASSES.items()})
        if name == "gender":
            return cls("gender", {g: [g] for g in space.genders})
        if name == "pitch":
            return cls("pitch_bin", {b: [b] for b in space.pitch_bins if b != "unvoiced"})
        if name == "phone":
            return cls("phone", {p: [p] for p in ARPABET})
        raise SelectionError(f"unknown property {name!r}; choose from {PROPERTIES} or give --groups FILE")

    @classmethod
    def load(cls, path: str | Path) -> "GroupSpec":
        """A JSON file ``{"axis": "...", "groups": {"name": [labels]}, "phones": [...]?}``."""
        try:
            raw = json.loads(Path(path).read_text())
            return cls(
                raw["axis"], {str(k): list(v) for k, v in raw["groups"].items()}, list(raw.get("phones", ARPABET))
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SelectionError(
                f"{path}: not a group file ({e}); expected "
                '{"axis": "phone|gender|pitch_bin", "groups": {"name": [labels]}}'
            ) from None

    def check(self, stats: Stats) -> None:
        space = stats.label_space
        if self.axis not in ("phone", "gender", "pitch_bin"):
            raise SelectionError(f"group axis {self.axis!r} is not one of phone, gender, pitch_bin")
        if len(self.groups) < 1:
            raise SelectionError("no groups given")
        vocab = set(space.vocab(self.axis))
        for name, labels in self.groups.items():
            unknown = sorted(set(labels) - vocab)
            if unknown or not labels:
                raise SelectionError(
                    f"group {name!r}: labels {unknown or labels} are not {self.axis} labels of this store"
                )
        unknown = sorted(set(self.phones) - set(space.phones))
        if unknown:
            raise SelectionError(f"phones {unknown} are not in this store")


@dataclass
class Selection:
    """Property neurons and the group neurons they come from."""

    property: str
    neurons: NeuronSet
    groups: dict[str, NeuronSet]
    settings: dict
    empty_cells: list[tuple[str, str]]


def cell_probabilities(stats: Stats, spec: GroupSpec, stat: str = "topk") -> dict[str, np.ndarray]:
    """Per group: P(j | group, p) as [layer, |Φ_g|, neuron] (NaN for cells without tokens)."""
    spec.check(stats)
    if spec.axis == "phone":
        p = stats.probability(stat, by=("phone",))
        return {g: p.sel(phone=labels).values for g, labels in spec.groups.items()}
    counts = stats.counts(stat, by=(spec.axis, "phone"))
    frames = stats.frames(by=(spec.axis, "phone"))
    out = {}
    for g, labels in spec.groups.items():
        c = counts.sel({spec.axis: labels, "phone": spec.phones}).sum(spec.axis).values
        n = frames.sel({spec.axis: labels, "phone": spec.phones}).sum(spec.axis).values
        with np.errstate(invalid="ignore", divide="ignore"):
            out[g] = c / np.where(n > 0, n, np.nan)[None, :, None]
    return out


def _empty_cells(probs: dict[str, np.ndarray], spec: GroupSpec) -> list[tuple[str, str]]:
    cells = []
    for g, p in probs.items():
        phones = spec.groups[g] if spec.axis == "phone" else spec.phones
        cells += [(g, phones[i]) for i in np.flatnonzero(np.isnan(p[0, :, 0]))]
    return cells


def property_neurons(
    stats: Stats,
    property: str = "gender",
    sigma: float = 0.8,
    stat: str = "topk",
    groups: GroupSpec | str | Path | None = None,
    rule: str = "paper",
    entropy_quantile: float = 0.01,
    min_prob_quantile: float = 0.95,
) -> Selection:
    """Selects the property neurons of ``property`` (or of user ``groups``) from a store."""
    if not 0 < sigma <= 1:
        raise SelectionError(f"sigma must be in (0, 1], got {sigma}")
    if rule not in RULES:
        raise SelectionError(f"unknown rule {rule!r}; choose from {RULES}")
    spec = GroupSpec.load(groups) if isinstance(groups, (str, Path)) else groups or GroupSpec.builtin(property, stats)
    probs = cell_probabilities(stats, spec, stat)
    empty = _empty_cells(probs, spec)
    if empty:
        warnings.warn(
            f"{len(empty)} (group, phone) cells have no tokens and count as not above chance: "
            + ", ".join(f"{g}/{p}" for g, p in empty[:10])
            + (" ..." if len(empty) > 10 else ""),
            stacklevel=2,
        )
    geometry = dict(num_layers=None, width=stats.width)
    layers = stats.layers
    if rule == "paper":
        chance = stats.chance
        member = {g: (np.nan_to_num(p, nan=-1.0) > chance).sum(1) / p.shape[1] >= sigma for g, p in probs.items()}
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
        "axis": spec.axis,
        "groups": spec.groups,
        "store": str(stats.path),
    }
    return Selection(property if groups is None else str(groups), exclusive, group_sets, settings, empty)


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
    """Sizes of the exclusive regions of up to three sets (summed over layers): each key names the
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
