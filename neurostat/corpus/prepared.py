"""The prepared corpus written by ``neurostat prepare``: the Python API over its utterances.

>>> corpus = PreparedCorpus("prepared/")
>>> for utt in corpus:
...     utt.id, utt.gender, utt.phone_frames(), utt.f0, utt.pitch_bins(), utt.joint_frames()
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..frames import FrameGeometry, label_frames
from ..labels.joint import LabelSpace
from ..labels.pitch import assign_bins
from ..labels.sets import LabelSet, LabelSetError
from .audio import Skip, load_audio
from .prepare import FORMAT


class PreparedCorpusError(ValueError):
    """A prepared-corpus folder that is missing, unfinished or of another format."""


@dataclass
class PreparedUtterance:
    """One labelled utterance: speaker, gender, phone intervals and F0 per frame centre."""

    corpus: "PreparedCorpus"
    record: dict

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def speaker(self) -> str:
        return self.record["speaker"]

    @property
    def gender(self) -> str:
        return self.record["gender"]

    @property
    def audio_path(self) -> Path:
        return Path(self.record["audio"])

    @property
    def num_frames(self) -> int:
        return self.record["num_frames"]

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        with np.load(self.corpus.path / "utts" / f"{self.id}.npz") as z:
            return {k: z[k] for k in ("starts", "ends", "phone", "f0")}

    @property
    def intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(start s, end s, phone index into ``corpus.phones``) of each aligned interval."""
        a = self._arrays
        return a["starts"], a["ends"], a["phone"]

    @property
    def f0(self) -> np.ndarray:
        """F0 in Hz at each frame centre of the prepared geometry (NaN = unvoiced)."""
        return self._arrays["f0"]

    def phone_frames(self, geometry: FrameGeometry | None = None) -> np.ndarray:
        """Phone index of each frame (by frame centre), −1 where no interval covers the centre."""
        geo = geometry or self.corpus.geometry
        n = geo.num_frames(self.record["num_samples"]) if geometry else self.num_frames
        return label_frames(*self.intervals, geo.centres(n))

    def pitch_bins(self) -> np.ndarray:
        """Pitch-bin index of each frame (the last bin is ``unvoiced``)."""
        return assign_bins(self.f0.astype(np.float64), self.corpus.edges)

    def part_labels(self, part: str) -> int | np.ndarray:
        """Index of ``part``'s label: one per frame (phone, pitch bin, frame-level sets) or one for the
        utterance (gender, utterance-level sets).  An utterance missing from a label set is a Skip."""
        if part == "phone":
            return self.phone_frames()
        if part == "pitch_bin":
            return self.pitch_bins()
        if part == "gender":
            return self.corpus.label_space.vocab("gender").index(self.gender)
        labels = self.corpus.label_set(part)
        if self.id not in labels:
            raise Skip(f"no-{part}-label", labels.path, f"utterance {self.id} has no {part!r} label")
        values = labels.labels(self.id)
        return int(values[0]) if labels.level == "utterance" else values

    def joint_frames(self, space: LabelSpace | None = None) -> np.ndarray:
        """Joint label id of each frame over ``space`` (default: every part of the corpus), −1 where
        any part is unlabelled."""
        space = space or self.corpus.label_space
        return space.encode({part: self.part_labels(part) for part in space.parts})

    def load_audio(self) -> np.ndarray:
        """The waveform at the prepared geometry's sample rate (float32, mono)."""
        wave, _ = load_audio(self.audio_path, self.corpus.geometry.sample_rate, strict=self.corpus.meta["strict"])
        return wave


class PreparedCorpus:
    """A folder written by ``neurostat prepare``; iterates :class:`PreparedUtterance`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise PreparedCorpusError(
                f"{self.path} is not a prepared corpus (no meta.json); run `neurostat prepare` first"
            )
        self.reload()

    def reload(self) -> None:
        """Reads meta.json and the manifest again (after a label set was attached or removed)."""
        meta_path = self.path / "meta.json"
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise PreparedCorpusError(
                f"{meta_path}: prepared-corpus format {self.meta.get('format')} is not {FORMAT}; re-run prepare"
            )
        lines = (self.path / "manifest.jsonl").read_text().splitlines()
        self.records = [json.loads(line) for line in lines if line.strip()]
        self.geometry = FrameGeometry.from_dict(self.meta["geometry"])
        self.edges = list(self.meta["pitch"]["edges"])
        self.phones = tuple(self.meta["phones"])
        self.label_sets: dict[str, dict] = dict(self.meta.get("label_sets", {}))
        self.label_space = LabelSpace.of(
            {
                "phone": self.phones,
                "gender": self.meta["genders"],
                "pitch_bin": self.meta["pitch"]["bins"],
                **{name: entry["vocab"] for name, entry in self.label_sets.items()},
            }
        )
        self._sets: dict[str, LabelSet] = {}

    def label_set(self, name: str) -> LabelSet:
        """An attached label set (see :mod:`neurostat.labels.sets`)."""
        if name not in self.label_sets:
            raise LabelSetError(f"{self.path} has no label set {name!r} (sets: {', '.join(self.label_sets) or 'none'})")
        if name not in self._sets:
            entry = self.label_sets[name]
            self._sets[name] = LabelSet(name, self.path / entry["file"], entry["level"], tuple(entry["vocab"]))
        return self._sets[name]

    def check_label_sets(self, parts: tuple[str, ...]) -> None:
        """Frame-level sets among ``parts`` must still have one label per frame of every utterance they
        label (a re-prepare with another model geometry breaks that); an error names the first mismatch."""
        frames = {r["id"]: r["num_frames"] for r in self.records}
        for name in parts:
            if name not in self.label_sets or self.label_sets[name]["level"] != "frame":
                continue
            labels = self.label_set(name)
            for utt, n in labels.lengths().items():
                if utt in frames and frames[utt] != n:
                    raise LabelSetError(
                        f"{labels.path}: utterance {utt} has {n} {name!r} labels but {frames[utt]} frames in "
                        f"{self.path} ({self.geometry.describe()}); attach the label set again"
                    )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> PreparedUtterance:
        return PreparedUtterance(self, self.records[i])

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def skips(self) -> dict[str, int]:
        return dict(self.meta["skips"])
