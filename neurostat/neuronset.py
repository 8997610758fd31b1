"""``NeuronSet``: per-layer sets of FFN neuron indices, in the paper's JSON format.

Layers are 1-based, as in the paper's files ``{"<layer>": [indices]}``.  Sets combine with ``|``,
``&`` and ``-``; ``overlap`` gives the exclusive regions of two sets per layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


class NeuronSetError(ValueError):
    """A neuron set that does not fit a model or cannot be read; the message says why."""


@dataclass(frozen=True)
class NeuronModel:
    """The model whose neurons a set indexes: its source (hub id or folder), revision, the SHA-1 of its
    weights (local folders; None for a hub id, whose revision names it) and its geometry (FFN entries — a
    Conformer layer has two — and the widest one's width).  ``select``
    records it in the settings file beside each neuron file; ``prune``, ``ablate``, ``report`` and
    ``browse`` compare it with the model they apply the file to."""

    source: str | None
    num_layers: int
    width: int
    weights: str | None = None
    revision: str | None = None

    @classmethod
    def of_store(cls, model: dict) -> NeuronModel:
        """From a store's model record (``StoreMeta.model``)."""
        entries = int(model.get("num_entries", model["num_layers"]))  # a Conformer's layers hold two FFN entries
        return cls(model.get("model"), entries, int(model["width"]), model.get("weights_sha1"), model.get("revision"))

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return f"{self.source} ({self.num_layers} layers x {self.width} neurons)"

    def differs_from(self, other: NeuronModel) -> str | None:
        """How ``other`` is another model than this one (None: the same): geometry first, then the weights
        where both know them, else the source and revision."""
        if (self.num_layers, self.width) != (other.num_layers, other.width):
            return "another geometry"
        if self.weights and other.weights:
            return None if self.weights == other.weights else "other weights"
        if (self.source, self.revision) != (other.source, other.revision):
            return "another model"
        return None

    @classmethod
    def recorded_for(cls, path: Path) -> NeuronModel | None:
        """What the settings file beside the neuron file ``path`` records (None: no settings file, or one
        written before models were recorded)."""
        settings = path.with_suffix(".settings.json")
        try:
            record = json.loads(settings.read_text()).get("model")
            return None if record is None else cls(**record)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise NeuronSetError(f"{settings}: cannot read the settings of {path.name} ({e})") from None


class NeuronSet:
    """Neuron indices per layer (1-based layers)."""

    def __init__(
        self, layers: Mapping[int, Iterable[int]] | None = None, num_layers: int | None = None, width: int | None = None
    ):
        self.sets: dict[int, frozenset[int]] = {int(k): frozenset(int(i) for i in v) for k, v in (layers or {}).items()}
        self.num_layers, self.width = num_layers, width
        if num_layers is not None or width is not None:
            self.validate(num_layers, width)

    def validate(self, num_layers: int | None, width: int | None, where: str = "neuron set") -> "NeuronSet":
        """Raises NeuronSetError when a layer or index does not exist in a model of this geometry."""
        for layer, idx in sorted(self.sets.items()):
            if layer < 1 or (num_layers is not None and layer > num_layers):
                raise NeuronSetError(f"{where}: layer {layer} does not exist (the model has layers 1..{num_layers})")
            bad = sorted(i for i in idx if i < 0 or (width is not None and i >= width))
            if bad:
                raise NeuronSetError(
                    f"{where}: layer {layer} has neuron indices out of range 0..{(width or 0) - 1}: "
                    f"{bad[:5]}{' ...' if len(bad) > 5 else ''}"
                )
        return self

    def _combine(self, other: "NeuronSet", op) -> "NeuronSet":
        if not isinstance(other, NeuronSet):
            return NotImplemented
        for mine, theirs, what in ((self.num_layers, other.num_layers, "layers"), (self.width, other.width, "width")):
            if mine is not None and theirs is not None and mine != theirs:
                raise NeuronSetError(f"cannot combine neuron sets of different models ({what} {mine} vs {theirs})")
        layers = set(self.sets) | set(other.sets)
        return NeuronSet(
            {n: op(self[n], other[n]) for n in layers}, self.num_layers or other.num_layers, self.width or other.width
        )

    def __or__(self, other):
        return self._combine(other, frozenset.__or__)

    def __and__(self, other):
        return self._combine(other, frozenset.__and__)

    def __sub__(self, other):
        return self._combine(other, frozenset.__sub__)

    def __getitem__(self, layer: int) -> frozenset[int]:
        return self.sets.get(int(layer), frozenset())

    def __eq__(self, other) -> bool:
        if not isinstance(other, NeuronSet):
            return NotImplemented
        layers = set(self.sets) | set(other.sets)
        return all(self[n] == other[n] for n in layers)

    def __len__(self) -> int:
        return sum(len(v) for v in self.sets.values())

    def __repr__(self) -> str:
        return f"NeuronSet({len(self)} neurons in {sum(1 for v in self.sets.values() if v)} layers)"

    @property
    def layers(self) -> list[int]:
        """Every layer the set knows of (1..num_layers when known), ascending."""
        return list(range(1, self.num_layers + 1)) if self.num_layers else sorted(self.sets)

    def counts(self) -> dict[int, int]:
        """Number of neurons per layer."""
        return {n: len(self[n]) for n in self.layers}

    def random_like(self, seed: int, avoid: "NeuronSet | None" = None, width: int | None = None) -> "NeuronSet":
        """A control set: as many neurons in each layer as this set, drawn uniformly (seeded) among the
        layer's neurons that are not in ``avoid``; ``width``: the layer width (default: the set's)."""
        width = width or self.width
        if width is None:
            raise NeuronSetError("random_like needs the layer width: give width= or a set that knows it")
        avoid = avoid or NeuronSet()
        rng = np.random.default_rng(seed)
        out = {}
        for layer, count in self.counts().items():
            pool = np.setdiff1d(np.arange(width), sorted(avoid[layer]))
            if count > len(pool):
                raise NeuronSetError(
                    f"layer {layer}: cannot draw {count} random neurons from the {len(pool)} not avoided"
                )
            out[layer] = rng.choice(pool, count, replace=False)
        return NeuronSet(out, self.num_layers, width)

    def overlap(self, other: "NeuronSet") -> dict[int, dict[str, int]]:
        """Per layer: neurons only in self, in both, only in other."""
        layers = sorted(set(self.layers) | set(other.layers))
        return {
            n: {
                "only_self": len(self[n] - other[n]),
                "both": len(self[n] & other[n]),
                "only_other": len(other[n] - self[n]),
            }
            for n in layers
        }

    def to_json(self) -> str:
        """The paper's format: ``{"<layer 1-based>": [sorted indices]}`` for every layer."""
        return json.dumps({str(n): sorted(self[n]) for n in self.layers})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_json(
        cls, text: str, num_layers: int | None = None, width: int | None = None, where: str = "neuron set"
    ) -> "NeuronSet":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise NeuronSetError(f"{where}: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise NeuronSetError(f'{where}: expected an object {{"<layer>": [indices]}}')
        layers = {}
        for key, value in raw.items():
            if (
                not str(key).lstrip("-").isdigit()
                or not isinstance(value, list)
                or not all(isinstance(i, int) for i in value)
            ):
                raise NeuronSetError(f"{where}: entry {key!r} must be a layer number mapped to a list of integers")
            layers[int(key)] = value
        out = cls(layers)
        out.validate(num_layers, width, where)
        out.num_layers, out.width = num_layers, width
        return out

    @classmethod
    def load(
        cls,
        path: str | Path,
        num_layers: int | None = None,
        width: int | None = None,
        model: NeuronModel | None = None,
        allow_other_model: bool = False,
    ) -> "NeuronSet":
        """Reads a neuron file, checked against a model's geometry; with ``model`` (the model the set is
        applied to), also against the model its settings file records — another model is an error unless
        ``allow_other_model`` (its indices would name other neurons, silently)."""
        path = Path(path)
        if not path.is_file():
            raise NeuronSetError(f"{path}: no such file")
        recorded = NeuronModel.recorded_for(path) if model is not None else None
        if recorded is not None and not allow_other_model:
            why = recorded.differs_from(model)
            if why:
                raise NeuronSetError(
                    f"{path} was selected on {recorded.describe()} ({path.with_suffix('.settings.json').name}), "
                    f"{why} than {model.describe()}: its indices would name other neurons here. Select on this "
                    "model's store, or pass --allow-other-model if the indices carry over"
                )
        if model is not None:
            num_layers, width = model.num_layers, model.width
        return cls.from_json(path.read_text(), num_layers, width, where=str(path))
