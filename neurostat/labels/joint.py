"""The joint label space phone × gender × pitch bin that one collection pass counts on.

Any marginal (phone; gender × phone; pitch bin × phone) is a sum over the other parts, so one
pass serves every property.  Joint id = (phone * G + gender) * B + pitch_bin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PARTS = ("phone", "gender", "pitch_bin")


@dataclass(frozen=True)
class LabelSpace:
    phones: tuple[str, ...]
    genders: tuple[str, ...]
    pitch_bins: tuple[str, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.phones), len(self.genders), len(self.pitch_bins)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def vocab(self, part: str) -> tuple[str, ...]:
        return {"phone": self.phones, "gender": self.genders, "pitch_bin": self.pitch_bins}[part]

    def encode(self, phone: np.ndarray, gender: int | np.ndarray, pitch_bin: np.ndarray) -> np.ndarray:
        """Joint ids; −1 wherever ``phone`` is −1."""
        _, g, b = self.shape
        joint = (np.asarray(phone) * g + gender) * b + np.asarray(pitch_bin)
        return np.where(np.asarray(phone) < 0, -1, joint).astype(np.int64)

    def decode(self) -> dict[str, np.ndarray]:
        """Index of each part for every joint label, in joint-id order."""
        p, g, b = np.unravel_index(np.arange(self.size), self.shape)
        return {"phone": p, "gender": g, "pitch_bin": b}

    def names(self) -> dict[str, np.ndarray]:
        """Name of each part for every joint label (the store's coordinates)."""
        return {part: np.asarray(self.vocab(part))[idx] for part, idx in self.decode().items()}

    def to_dict(self) -> dict:
        return {"phone": list(self.phones), "gender": list(self.genders), "pitch_bin": list(self.pitch_bins)}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelSpace":
        return cls(tuple(d["phone"]), tuple(d["gender"]), tuple(d["pitch_bin"]))
