"""The official label files of Lin et al. as a prepared corpus (compare them with neurostat's labels:
:func:`neurostat.compare.compare_labels`).

The official repository's dev-clean labels, as JSON files in one folder:

- ``phones.json``: ``{utterance: [label index per 20 ms frame]}``;
- ``phone_table.json``: ``{phone: [index, count]}`` (41 labels: ``""`` silence = 0, ``"spn"``, 39 phones
  with or without stress digits);
- ``pitch.json``: ``{utterance: [pitch class per 20 ms frame, -1 unvoiced]}`` (0 low, 1 mid, 2 high);
- ``gender.json``: ``{speaker: "M" | "F"}``.

Frame counts: the official files have ``int(duration * 50)`` frames, the model
``floor((L - 400) / 320) + 1`` — one fewer when the last 20 ms cell is shorter than the receptive
field allows.  A label file one frame longer than the model's count loses its last frame; one frame
shorter leaves the model's last frame unlabelled (not a token); any other difference is an error.
The pitch file is usually shorter than the phone file (by 0–21 frames): its classes are first put on the
phone file's frames as the official code does (:func:`official_pitch`: left-padded with unvoiced).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..files import check_out_folder
from ..frames import FrameGeometry
from ..phones import PHONES, PhoneMap, UnknownPhoneError
from .audio import Skip, load_audio, skip_record
from .librispeech import scan, subset_dir
from .pitch import UNVOICED
from .prepared import PitchMeta, PrepareLock, PreparedCorpus, PreparedMeta, is_prepared

FILES = {"phones": "phones.json", "table": "phone_table.json", "pitch": "pitch.json", "gender": "gender.json"}
OFFICIAL_NAMES = {
    "phones": "*-framewise-phone-merge-20ms.json",
    "table": "*-label-merge.json",
    "pitch": "pitch-discrete-*.json",
    "gender": "libri-*-spk-gender.json",
}
"""The names the official repository's ``info/`` folder gives the same files (read when the short names
are absent, so that folder works as it is)."""
PITCH_CLASSES = ("low", "mid", "high")


class PaperLabelsError(ValueError):
    """An official label file that cannot be read as documented; the message names it."""


def label_file(folder: Path, what: str) -> Path:
    """The file of ``what`` in ``folder``: its short name, else its one match of the official name."""
    short = folder / FILES[what]
    if short.is_file():
        return short
    matches = sorted(folder.glob(OFFICIAL_NAMES[what]))
    if len(matches) > 1:
        raise PaperLabelsError(f"{folder}: several official {what} files ({', '.join(m.name for m in matches)})")
    return matches[0] if matches else short


def _read(folder: Path, what: str) -> dict:
    path = label_file(folder, what)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PaperLabelsError(f"{path}: cannot read the official {what} file ({e})") from None
    if not isinstance(data, dict):
        raise PaperLabelsError(f"{path}: expected a JSON object")
    return data


def _frame_labels(folder: Path, what: str, utt: str, frames: object) -> list[int]:
    """An utterance's per-frame labels: a list of integers, else an error naming the file, utterance and value."""
    if not isinstance(frames, list):
        raise PaperLabelsError(
            f"{label_file(folder, what)}: utterance {utt}: expected a list of per-frame integers, got {frames!r:.60}"
        )
    for i, label in enumerate(frames):
        if not isinstance(label, int) or isinstance(label, bool):
            raise PaperLabelsError(
                f"{label_file(folder, what)}: utterance {utt}, frame {i}: label {label!r:.60} is not an integer"
            )
    return frames


def read_paper_labels(folder: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """(phone index into ``PHONES`` per frame, pitch class per frame (-1 unvoiced), gender per speaker)."""
    folder = Path(folder)
    table = _read(folder, "table")
    to_phone = {}
    for symbol, entry in table.items():
        try:
            to_phone[int(entry[0])] = PHONES.index(PhoneMap()(symbol))
        except (UnknownPhoneError, TypeError, ValueError, IndexError):
            raise PaperLabelsError(
                f"{label_file(folder, 'table')}: entry {symbol!r}: {entry!r} is not a phone"
            ) from None
    phones = {}
    for utt, frames in _read(folder, "phones").items():
        frames = _frame_labels(folder, "phones", utt, frames)
        unknown = sorted(set(frames) - set(to_phone))
        if unknown:
            raise PaperLabelsError(
                f"{label_file(folder, 'phones')}: utterance {utt} uses label index {unknown[0]}, which "
                f"{label_file(folder, 'table').name} does not define"
            )
        phones[utt] = np.array([to_phone[i] for i in frames], dtype=np.int16)
    pitch = {}
    for utt, frames in _read(folder, "pitch").items():
        values = np.asarray(_frame_labels(folder, "pitch", utt, frames), dtype=np.int64)
        if ((values < -1) | (values >= len(PITCH_CLASSES))).any():
            raise PaperLabelsError(f"{label_file(folder, 'pitch')}: utterance {utt} has a pitch class outside -1..2")
        pitch[utt] = values
    gender = {str(k): str(v) for k, v in _read(folder, "gender").items()}
    bad = sorted(k for k, v in gender.items() if v not in ("M", "F"))
    if bad:
        raise PaperLabelsError(f"{label_file(folder, 'gender')}: speaker {bad[0]} is neither M nor F")
    return phones, pitch, gender


def official_pitch(classes: np.ndarray, frames: int) -> np.ndarray:
    """The pitch classes on the phone file's ``frames`` as the official code aligns them: the pitch file is
    shorter (by 0–21 frames in dev-clean), and the official code left-pads it with unvoiced (−1) by the
    gap; a longer list keeps its last ``frames`` classes (the ends aligned as well)."""
    gap = frames - len(classes)
    if gap >= 0:
        return np.concatenate([np.full(gap, -1, dtype=classes.dtype), classes])
    return classes[len(classes) - frames :]


def _fit(labels: np.ndarray, n: int, what: str, utt: str, fill: int) -> np.ndarray:
    """The labels cut or padded to the model's ``n`` frames (see the module docstring)."""
    if len(labels) in (n, n + 1):
        return labels[:n]
    if len(labels) == n - 1:
        return np.concatenate([labels, [fill]])
    raise PaperLabelsError(f"utterance {utt}: {len(labels)} {what} labels for {n} model frames (more than one off)")


def prepare_paper_labels(
    root: str | Path, subset: str, folder: str | Path, out: str | Path, geometry: FrameGeometry, progress: bool = True
) -> PreparedMeta:
    """A prepared corpus from the official label files (audio from ``root``): phone intervals are the
    20 ms cells of the labels, pitch bins the official classes (no F0).  Returns its :class:`PreparedMeta`."""
    if geometry.stride * 50 != geometry.sample_rate:
        raise PaperLabelsError(f"the official labels are on a 20 ms grid; the model's frames are {geometry.describe()}")
    out = check_out_folder(out, "prepared corpus", is_prepared, (subset_dir(root, subset), folder))
    phones, pitch, gender = read_paper_labels(folder)
    with PrepareLock(out):
        PreparedCorpus.clear_leftovers(out)
        return _write_paper_labels(root, subset, folder, out, geometry, phones, pitch, gender, progress)


def _write_paper_labels(
    root, subset: str, folder, out: Path, geometry: FrameGeometry, phones: dict, pitch: dict, gender: dict, progress
) -> PreparedMeta:
    """Each utterance's cache file, then the folder's files (the caller holds the folder's lock)."""
    cell = geometry.stride / geometry.sample_rate
    records, skips = [], []
    for u in tqdm(scan(root, subset), desc="paper labels", unit="utt", disable=not progress):
        if u.id not in phones or u.id not in pitch:
            skips.append(skip_record(u.id, "no-paper-label", folder, "no official labels"))
            continue
        if u.speaker not in gender:
            raise PaperLabelsError(
                f"{label_file(Path(folder), 'gender')}: speaker {u.speaker} (of {u.id}) has no gender"
            )
        try:
            wave, source_rate, audio_sha1 = load_audio(u.audio, geometry.sample_rate)
        except Skip as s:
            skips.append(s.record(u.id))
            continue
        n = geometry.num_frames(len(wave))
        frames = _fit(phones[u.id], n, "phone", u.id, -1)
        classes = _fit(official_pitch(pitch[u.id], len(phones[u.id])), n, "pitch", u.id, -1)
        change = np.flatnonzero(np.r_[True, frames[1:] != frames[:-1]])
        ends = np.r_[change[1:], n]
        labelled = frames[change] >= 0
        record = {
            "id": u.id,
            "speaker": u.speaker,
            "chapter": u.chapter,
            "gender": gender[u.speaker],
            "audio": str(u.audio),
            "num_samples": len(wave),
            "num_frames": n,
            "source_sample_rate": source_rate,
            "resampled": source_rate != geometry.sample_rate,
            "audio_sha1": audio_sha1,
        }
        PreparedCorpus.write_utterance(
            out,
            record,
            "paper-labels",
            starts=(change * cell)[labelled],
            ends=(ends * cell)[labelled],
            phone=frames[change][labelled],
            f0=np.full(n, np.nan, dtype=np.float32),
            pitch_bins=np.where(classes < 0, len(PITCH_CLASSES), classes),
        )
        records.append(record)
    if not records:
        raise PaperLabelsError(f"no utterance of {subset} under {root} has official labels in {folder}")
    meta = PreparedMeta(
        corpus="librispeech",
        root=str(Path(root).resolve()),
        subset=subset,
        alignments=None,
        paper_labels=str(Path(folder).resolve()),
        geometry=geometry.to_dict(),
        phones=list(PHONES),
        genders=["M", "F"],
        phone_map="official phone table",
        pitch=PitchMeta(
            method="paper-labels",
            edges=[],
            bins=[*PITCH_CLASSES, UNVOICED],
            quantiles=None,
            rule="paper",
            align="paper",
        ),
        frame_labels="overlap",
        strict=False,
        num_utterances=len(records),
        num_frames=int(sum(r["num_frames"] for r in records)),
        hours=sum(r["num_samples"] for r in records) / geometry.sample_rate / 3600,
        resampled=sum(r["resampled"] for r in records),
        skips=dict(Counter(s["reason"] for s in skips)),
    )
    return PreparedCorpus.create(out, meta, sorted(records, key=lambda r: r["id"]), skips).meta
