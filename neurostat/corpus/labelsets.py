"""Label sets attached to a prepared corpus: extra label parts, one label per model frame or per utterance.

They carry the follow-up paper's groupings — k-means units of SSL features (per frame), clusters of
utterance embeddings such as i-vectors (per utterance) — or any other labelling, into the joint label
space that ``collect`` counts on.  A set lives in ``<prepared>/labels/<name>-<hash>.npz`` (utterance
ids, offsets, vocabulary) and ``<name>-<hash>.values.npy`` (label indices, memory-mapped by every
data-loading worker), named by a hash of the content, and is listed under ``label_sets`` in
``meta.json``; replacing a set writes new files and switches ``meta.json`` to them with one atomic
rename, so a crash never mixes two versions.

Text format read by :func:`read_label_file` (Kaldi-style, one utterance a line, ``#`` comments)::

    1272-128104-0000 17 17 17 4 4 ...     # frame level: one label per model frame
    1272-128104-0000 cluster3             # utterance level: one label
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..choices import LEVELS
from ..declarations import STORE_NAMES
from .prepared import BASE_PARTS, LabelSetError, PreparedCorpus

# names a set cannot take: the base parts, the store's dimensions and coordinates, and "pitch" (the pitch
# property in select)
_TAKEN = BASE_PARTS + STORE_NAMES + ("pitch",)


def check_name(name: str) -> None:
    if not name.isidentifier() or name in _TAKEN:
        raise LabelSetError(
            f"{name!r} cannot name a label set: use an identifier (letters, digits, _) other than {', '.join(_TAKEN)}"
        )


def read_id_lines(path: str | Path, what: str) -> dict[str, tuple[int, list[str]]]:
    """``{utterance id: (line number, fields after the id)}`` from ``<id> field ...`` lines (``#`` comments,
    blank lines skipped); an unreadable file, a repeated or field-less id, or no line at all is an error."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LabelSetError(f"{path}: cannot read the {what} file ({e})") from None
    rows: dict[str, tuple[int, list[str]]] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        utt = fields[0]
        if utt in rows:
            raise LabelSetError(f"{path}:{number}: utterance {utt} already has {what}s on line {rows[utt][0]}")
        if len(fields) == 1:
            raise LabelSetError(f"{path}:{number}: utterance {utt} has no {what}s")
        rows[utt] = (number, fields[1:])
    if not rows:
        raise LabelSetError(f"{path}: no utterances with {what}s")
    return rows


def read_label_file(path: str | Path, level: str) -> dict[str, np.ndarray]:
    """``{utterance id: labels}`` from a text file of ``<id> <label> ...`` lines (integer arrays when every
    label is an integer, so clusters sort as numbers)."""
    if level not in LEVELS:
        raise LabelSetError(f"unknown level {level!r}; choose one of {LEVELS}")
    rows = read_id_lines(path, "label")
    if level == "utterance":
        for utt, (number, labels) in rows.items():
            if len(labels) != 1:
                raise LabelSetError(
                    f"{path}:{number}: utterance {utt} has {len(labels)} labels; an utterance-level file has one a line"
                )
    try:
        return {u: np.asarray(labels, dtype=np.int64) for u, (_, labels) in rows.items()}
    except ValueError:
        return {u: np.asarray(labels) for u, (_, labels) in rows.items()}


def attach_label_set(
    corpus: PreparedCorpus,
    name: str,
    labels: Mapping[str, np.ndarray | Sequence],
    level: str,
    source: str,
    allow_missing: bool = False,
    info: dict | None = None,
) -> dict:
    """Checks ``labels`` against the corpus and writes them as label set ``name``; returns its meta entry.

    Frame-level labels must have exactly one label per model frame of each utterance; every utterance
    of the corpus needs labels unless ``allow_missing`` (then ``collect`` skips and reports the others).
    """
    check_name(name)
    if level not in LEVELS:
        raise LabelSetError(f"unknown level {level!r}; choose one of {LEVELS}")
    frames = {r["id"]: r["num_frames"] for r in corpus.records}
    used = [u for u in sorted(labels) if u in frames]
    missing = [u for u in frames if u not in labels]
    if not used:
        raise LabelSetError(f"{source}: none of its {len(labels)} utterances is in {corpus.path}")
    if missing and not allow_missing:
        raise LabelSetError(
            f"{source}: no labels for {len(missing)} of the {len(frames)} utterances of {corpus.path} "
            f"(first: {', '.join(missing[:3])}); pass --allow-missing to skip them in collect"
        )
    if level == "frame":
        for u in used:
            if len(labels[u]) != frames[u]:
                raise LabelSetError(
                    f"{source}: utterance {u} has {len(labels[u])} labels but {frames[u]} model frames "
                    f"({corpus.geometry.describe()}); frame-level labels need one label per frame"
                )
    values = [np.asarray(labels[u]) for u in used]
    kinds = {v.dtype.kind for v in values}
    if len(kinds) > 1:
        values = [v.astype(str) for v in values]
    unique, inverse = np.unique(np.concatenate(values), return_inverse=True)
    vocab = [str(v) for v in unique]
    offsets = np.zeros(len(used) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(v) for v in values])
    ids, values, vocabulary = np.asarray(used), inverse.astype(np.int32), np.asarray(vocab)
    digest = hashlib.sha1(level.encode())
    for array in (ids, offsets, values, vocabulary):
        digest.update(np.ascontiguousarray(array).tobytes())
    # files named by their content: new ones first, then meta.json switches to them in one rename;
    # stores record the name, so a resume or merge across different labels is refused
    entry = {
        "level": level,
        "vocab": vocab,
        "source": source,
        "utterances": len(used),
        "missing": len(missing),
        "unused": len(labels) - len(used),
        **(info or {}),
    }
    stem = f"{name}-{digest.hexdigest()[:12]}"
    return corpus.write_label_set(name, entry, stem, ids=ids, offsets=offsets, vocab=vocabulary, values=values)


def describe_label_set(name: str, entry: dict) -> str:
    """One line about an attached label set (what `neurostat labels` prints)."""
    vocab = entry["vocab"]
    shown = ", ".join(vocab[:10]) + (", ..." if len(vocab) > 10 else "")
    missing = f", {entry['missing']} without labels (skipped by collect)" if entry["missing"] else ""
    return (
        f"{name}: {entry['level']} level, {len(vocab)} labels ({shown}); {entry['utterances']} utterances"
        f"{missing}; from {entry['source']}"
    )
