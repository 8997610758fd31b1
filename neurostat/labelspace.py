"""The joint label space that one collection pass counts on: phone × gender × pitch bin (× extra sets).

Any marginal (phone; gender × phone; pitch bin × phone; cluster × phone ...) is a sum over the other
parts, so one pass serves every property.  The joint id is the row-major index of the parts' indices
in part order (for the base parts: ``(phone * G + gender) * B + pitch_bin``).  Extra parts are label
sets attached to a prepared corpus (k-means units of SSL features, utterance clusters ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .declarations import STORE_NAMES


@dataclass(frozen=True)
class LabelSpace:
    """Ordered label parts, each with its vocabulary."""

    vocabularies: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, vocabularies: Mapping[str, Sequence[str]]) -> "LabelSpace":
        if not vocabularies:
            raise ValueError("a label space needs at least one part")
        for name, vocab in vocabularies.items():
            if name in STORE_NAMES or not name.isidentifier():
                raise ValueError(f"{name!r} cannot name a label part (an identifier other than {STORE_NAMES})")
            if len(vocab) == 0 or len(set(vocab)) != len(vocab):
                raise ValueError(f"label part {name!r}: the vocabulary must be non-empty and without repeats")
        return cls(tuple((name, tuple(str(v) for v in vocab)) for name, vocab in vocabularies.items()))

    @classmethod
    def of_corpus(cls, corpus, parts: Sequence[str] | None = None) -> "LabelSpace":
        """The joint label space of a prepared corpus over ``parts`` (default: all of its label parts:
        phone, gender, pitch bin and every attached label set)."""
        space = cls.of(corpus.vocabularies)
        if parts is None:
            return space
        parts = tuple(parts)
        if not parts or len(set(parts)) != len(parts):
            raise ValueError(f"--labels needs distinct label parts, got {','.join(parts) or 'none'}")
        unknown = [p for p in parts if p not in space.parts]
        if unknown:
            raise ValueError(
                f"{corpus.path} has no label part {', '.join(unknown)}; its parts are {', '.join(space.parts)} "
                f"(attach more with `neurostat labels add` or `neurostat cluster`)"
            )
        return space.subspace(parts)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.vocabularies)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(vocab) for _, vocab in self.vocabularies)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def vocab(self, part: str) -> tuple[str, ...]:
        for name, vocab in self.vocabularies:
            if name == part:
                return vocab
        raise KeyError(f"no label part {part!r} (parts: {', '.join(self.parts)})")

    def subspace(self, parts: Sequence[str]) -> "LabelSpace":
        """The space of the given parts only (in this space's order)."""
        unknown = [p for p in parts if p not in self.parts]
        if unknown:
            raise KeyError(f"no label part {', '.join(map(repr, unknown))} (parts: {', '.join(self.parts)})")
        return LabelSpace(tuple((n, v) for n, v in self.vocabularies if n in parts))

    def encode(self, indices: Mapping[str, int | np.ndarray]) -> np.ndarray:
        """Joint ids from each part's index (an array per frame, or one int for the whole utterance);
        −1 wherever any part is −1."""
        arrays = [np.asarray(indices[p], dtype=np.int64) for p in self.parts]
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        joint = np.zeros(shape, dtype=np.int64)
        missing = np.zeros(shape, dtype=bool)
        for idx, n in zip(arrays, self.shape):
            joint *= n
            joint += idx
            missing |= idx < 0
        return np.where(missing, -1, joint)

    def joint_frames(self, utterance) -> np.ndarray:
        """Joint label id of each frame of a prepared utterance, −1 where any part is unlabelled."""
        return self.encode({part: utterance.part_labels(part) for part in self.parts})

    def decode(self) -> dict[str, np.ndarray]:
        """Index of each part for every joint label, in joint-id order."""
        return dict(zip(self.parts, np.unravel_index(np.arange(self.size), self.shape)))

    def names(self) -> dict[str, np.ndarray]:
        """Name of each part for every joint label (the store's coordinates)."""
        return {part: np.asarray(self.vocab(part))[idx] for part, idx in self.decode().items()}

    def to_dict(self) -> dict[str, list[str]]:
        return {name: list(vocab) for name, vocab in self.vocabularies}

    @classmethod
    def from_dict(cls, d: Mapping[str, Sequence[str]]) -> "LabelSpace":
        return cls.of(d)
