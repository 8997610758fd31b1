"""Two labellings of the same utterances side by side (e.g. neurostat's and the paper's official labels)."""

from __future__ import annotations

from collections import Counter

import numpy as np

from .corpus.prepared import PreparedCorpus
from .engine.tokens import token_mask
from .phones import PHONES


def compare_labels(a: PreparedCorpus, b: PreparedCorpus, tokens: str = "phone-mid") -> str:
    """Two labellings of the same utterances side by side: per-frame agreement of phones and pitch bins,
    tokens per phone and per (pitch bin, phone) cell."""
    if a.geometry != b.geometry:
        raise ValueError(f"{a.path} and {b.path} have different frame geometries")
    ids = sorted({r["id"] for r in a.records} & {r["id"] for r in b.records})
    if not ids:
        raise ValueError(f"{a.path} and {b.path} share no utterance")
    index = {c: {r["id"]: i for i, r in enumerate(c.records)} for c in (a, b)}
    lengths = {utt: (a[index[a][utt]].num_frames, b[index[b][utt]].num_frames) for utt in ids}
    differ = [(utt, n, m) for utt, (n, m) in lengths.items() if n != m]
    if differ:
        utt, n, m = differ[0]
        raise ValueError(
            f"{len(differ)} of the {len(ids)} utterances in both have other frame counts in {a.path} and {b.path} "
            f"(first: {utt}, {n} vs {m} frames): the two labellings cover other audio (a trimmed or padded file, "
            "another front end); compare corpora prepared from the same audio"
        )
    same_phone = same_bin = total = 0
    phone_tokens = {c: Counter() for c in (a, b)}
    cells = {c: Counter() for c in (a, b)}
    for utt in ids:
        ua, ub = a[index[a][utt]], b[index[b][utt]]
        pa, pb = ua.phone_frames(), ub.phone_frames()
        ba, bb = ua.pitch_bins(), ub.pitch_bins()
        same_phone += int((pa == pb).sum())
        same_bin += int((ba == bb).sum())
        total += len(pa)
        for c, u, p, bins in ((a, ua, pa, ba), (b, ub, pb, bb)):
            for t in np.flatnonzero(token_mask(p, tokens)):
                phone_tokens[c][c.phones[p[t]]] += 1
                cells[c][(c.meta.pitch.bins[bins[t]], c.phones[p[t]])] += 1
    lines = [
        f"{len(ids)} utterances in both; frames: phones agree on {100 * same_phone / total:.1f}%, "
        f"pitch bins on {100 * same_bin / total:.1f}% of {total}",
        f"{tokens} tokens per phone ({a.path.name} / {b.path.name}): "
        + ", ".join(f"{p} {phone_tokens[a][p]}/{phone_tokens[b][p]}" for p in PHONES),
        "tokens per (pitch bin, phone) cell that differ: "
        + (
            ", ".join(
                f"{bin_}/{p} {cells[a][(bin_, p)]}/{cells[b][(bin_, p)]}"
                for bin_, p in sorted(set(cells[a]) | set(cells[b]))
                if cells[a][(bin_, p)] != cells[b][(bin_, p)]
            )
            or "none"
        ),
    ]
    return "\n".join(lines)
