"""``neurostat prepare``: labels of a LibriSpeech-layout corpus, written as a prepared-corpus folder.

Layout of the folder (read back by :mod:`neurostat.corpus.prepared`):

- ``meta.json`` – vocabularies, phone mapping, frame geometry, pitch method and bin edges,
  settings, counts and skips by reason;
- ``manifest.jsonl`` – one line per usable utterance (id, speaker, gender, audio path, lengths);
- ``skips.jsonl`` – one line per skipped utterance (id, reason, file, message);
- ``utts/<id>.npz`` – phone intervals (seconds, phone index) and F0 at every frame centre;
- ``labels/<name>.npz`` – label sets attached later (:mod:`neurostat.labels.sets`), kept across re-runs.

Per-utterance files carry a key of their inputs (file sizes/mtimes, settings), so a second run
reuses what is done and redoes only what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import __version__
from ..frames import FrameGeometry
from ..labels.pitch import METHODS, bin_names, f0_at, percentile_edges
from ..labels.speakers import GENDERS, read_speakers
from ..labels.textgrid import TextGridError, read_textgrid
from ..phones import PHONES, PhoneMap, UnknownPhoneError
from ..store import atomic_write
from .audio import Skip, load_audio
from .librispeech import corpus_dir, index_alignments, scan

FORMAT = 1


class PrepareError(RuntimeError):
    """Prepare cannot go on (``--strict`` turns every skip into one)."""


@dataclass
class PrepareSettings:
    geometry: FrameGeometry
    pitch: str = "praat"
    quantiles: tuple[float, ...] = (1 / 3, 2 / 3)
    edges: tuple[float, ...] | None = None
    phone_map: PhoneMap = field(default_factory=PhoneMap)
    strict: bool = False

    def key(self) -> dict:
        return {
            "geometry": self.geometry.to_dict(),
            "pitch": self.pitch,
            "phone_map": self.phone_map.describe(),
            "strict": self.strict,
            "format": FORMAT,
        }


def _stat(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _utt_key(audio: Path, textgrid: Path, settings: PrepareSettings) -> str:
    blob = json.dumps([_stat(audio), _stat(textgrid), settings.key()], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def _phone_intervals(textgrid: Path, phone_map: PhoneMap, duration: float, frame: float):
    grid = read_textgrid(textgrid)
    tiers = {name.lower(): items for name, items in grid.tiers.items()}
    if "phones" not in tiers:
        raise Skip("no-phones-tier", textgrid, f"no 'phones' tier (tiers: {', '.join(grid.tiers) or 'none'})")
    items = tiers["phones"]
    if not items:
        raise Skip("no-phones-tier", textgrid, "the 'phones' tier is empty")
    end = items[-1].xmax
    if abs(end - duration) > frame:
        side = "before" if end < duration else "after"
        raise Skip(
            "length-mismatch",
            textgrid,
            f"alignment ends at {end:.3f} s, {abs(end - duration):.3f} s {side} the audio ({duration:.3f} s); more than one frame ({frame:.3f} s)",
        )
    try:
        ids = np.array([PHONES.index(phone_map(iv.text)) for iv in items], dtype=np.int16)
    except UnknownPhoneError as e:
        raise Skip("unknown-phone", textgrid, str(e)) from None
    starts = np.array([iv.xmin for iv in items], dtype=np.float64)
    ends = np.array([iv.xmax for iv in items], dtype=np.float64)
    keep = ends > starts
    return starts[keep], ends[keep], ids[keep]


def _prepare_one(task: tuple) -> tuple[str, dict]:
    """Labels one utterance; returns ("ok", record) or ("skip", skip record)."""
    utt, textgrid, out_dir, settings = task
    audio = Path(utt["audio"])
    try:
        if textgrid is None:
            raise Skip("missing-textgrid", audio, "no TextGrid for this utterance in the alignments directory")
        textgrid = Path(textgrid)
        target = Path(out_dir) / "utts" / f"{utt['id']}.npz"
        key = _utt_key(audio, textgrid, settings)
        if target.is_file():
            with np.load(target) as cached:
                if str(cached["key"]) == key:
                    return "ok", json.loads(str(cached["record"]))
        geo = settings.geometry
        wave, source_rate = load_audio(audio, geo.sample_rate, strict=settings.strict)
        n_frames = geo.num_frames(len(wave))
        if n_frames == 0:
            raise Skip(
                "too-short", audio, f"{len(wave)} samples is shorter than one frame ({geo.receptive_field} samples)"
            )
        starts, ends, ids = _phone_intervals(
            textgrid, settings.phone_map, len(wave) / geo.sample_rate, geo.stride / geo.sample_rate
        )
        f0 = f0_at(settings.pitch, wave, geo.sample_rate, geo.centres(n_frames), geo.stride / geo.sample_rate / 2)
    except TextGridError as e:
        return "skip", {"id": utt["id"], "reason": "bad-textgrid", "file": str(textgrid), "message": str(e)}
    except Skip as s:
        return "skip", {"id": utt["id"], "reason": s.reason, "file": s.path, "message": s.message}
    record = {
        **utt,
        "textgrid": str(textgrid),
        "num_samples": len(wave),
        "num_frames": n_frames,
        "source_sample_rate": source_rate,
        "resampled": source_rate != geo.sample_rate,
    }
    tmp = target.with_suffix(".tmp.npz")
    np.savez(tmp, key=key, record=json.dumps(record), starts=starts, ends=ends, phone=ids, f0=f0.astype(np.float32))
    os.replace(tmp, target)
    return "ok", record


def prepare(
    root: str | Path,
    subset: str,
    alignments: str | Path,
    out: str | Path,
    settings: PrepareSettings,
    num_jobs: int = 1,
    progress: bool = True,
) -> dict:
    """Prepares ``subset`` of the corpus at ``root`` into ``out``; returns the meta dict."""
    if settings.pitch not in METHODS:
        raise PrepareError(f"unknown pitch method {settings.pitch!r}; choose one of {METHODS}")
    utterances = scan(root, subset)
    speakers = read_speakers(corpus_dir(root) / "SPEAKERS.TXT")
    grids = index_alignments(alignments, subset)
    out = Path(out)
    (out / "utts").mkdir(parents=True, exist_ok=True)

    tasks, skips = [], []
    for u in utterances:
        if u.speaker not in speakers:
            skips.append(
                {
                    "id": u.id,
                    "reason": "unknown-speaker",
                    "file": str(u.audio),
                    "message": f"speaker {u.speaker} is not in SPEAKERS.TXT",
                }
            )
            continue
        utt = {
            "id": u.id,
            "speaker": u.speaker,
            "chapter": u.chapter,
            "gender": speakers[u.speaker].sex,
            "audio": str(u.audio),
        }
        tasks.append((utt, str(grids[u.id]) if u.id in grids else None, str(out), settings))

    records = []
    bar = tqdm(total=len(tasks), desc=f"prepare {subset}", unit="utt", disable=not progress)
    if num_jobs > 1:
        with ProcessPoolExecutor(max_workers=num_jobs) as pool:
            results = pool.map(_prepare_one, tasks, chunksize=max(1, min(16, len(tasks) // (4 * num_jobs))))
            for kind, rec in results:
                (records if kind == "ok" else skips).append(rec)
                bar.update()
    else:
        for task in tasks:
            kind, rec = _prepare_one(task)
            (records if kind == "ok" else skips).append(rec)
            bar.update()
    bar.close()
    if skips and settings.strict:
        first = skips[0]
        raise PrepareError(f"{first['file']}: {first['message']} (--strict; {len(skips)} problem(s) in all)")
    if not records:
        raise PrepareError(
            f"no usable utterances in {subset}: " + "; ".join(f"{s['file']}: {s['message']}" for s in skips[:3])
        )

    records.sort(key=lambda r: r["id"])
    if settings.edges is not None:
        edges = sorted(float(e) for e in settings.edges)
    else:
        f0 = np.concatenate([np.load(out / "utts" / f"{r['id']}.npz")["f0"] for r in records])
        edges = percentile_edges(f0, list(settings.quantiles))
    if len(set(edges)) != len(edges):
        raise PrepareError(f"pitch bin edges must be distinct, got {edges}")

    meta = {
        "format": FORMAT,
        "neurostat_version": __version__,
        "corpus": "librispeech",
        "root": str(Path(root).resolve()),
        "subset": subset,
        "alignments": str(Path(alignments).resolve()),
        "geometry": settings.geometry.to_dict(),
        "phones": list(PHONES),
        "genders": list(GENDERS),
        "phone_map": settings.phone_map.describe(),
        "pitch": {
            "method": settings.pitch,
            "edges": edges,
            "bins": bin_names(len(edges)),
            "quantiles": None if settings.edges is not None else list(settings.quantiles),
            "rule": "[e_i, e_{i+1})",
        },
        "strict": settings.strict,
        "num_utterances": len(records),
        "num_frames": int(sum(r["num_frames"] for r in records)),
        "hours": sum(r["num_samples"] for r in records) / settings.geometry.sample_rate / 3600,
        "resampled": sum(r["resampled"] for r in records),
        "skips": dict(Counter(s["reason"] for s in skips)),
        "label_sets": _kept_label_sets(out),
    }
    _write_lines(out / "manifest.jsonl", records)
    _write_lines(out / "skips.jsonl", skips)
    atomic_write(out / "meta.json", json.dumps(meta, indent=1))
    return meta


def _kept_label_sets(out: Path) -> dict:
    """Label sets attached to an earlier run of prepare into ``out`` whose files are still there."""
    try:
        old = json.loads((out / "meta.json").read_text()).get("label_sets", {})
    except (OSError, ValueError):
        return {}
    return {name: entry for name, entry in old.items() if (out / entry["file"]).is_file()}


def _write_lines(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
