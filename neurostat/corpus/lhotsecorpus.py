"""Lhotse manifests (``--corpus lhotse``), read with the ``lhotse`` package (``pip install 'neurostat[lhotse]'``).

``root`` is a folder with ``recordings.jsonl.gz`` and ``supervisions.jsonl.gz``, or a ``cuts.jsonl.gz``
(a recipe's ``<corpus>_recordings_<part>.jsonl.gz`` names are found with ``--subset <part>``).  Each
supervision is an utterance: the span of its recording from its start for its duration, cut to the sample by
Lhotse; speaker and gender (optional) from the supervision; phone intervals from ``alignment["phone"]``
(times on the recording's timeline, as Lhotse keeps them) or, where a supervision has none, from a TextGrid
in ``--alignments`` named by the supervision's or the recording's id.  A cut's supervisions are moved to
the recording's timeline first.  Lhotse also reads the audio at ``collect``.
"""

from __future__ import annotations

import re
from pathlib import Path

from .audio import skip_record
from .lhotseaudio import lhotse_module
from .librispeech import index_alignments
from .source import (
    AudioRef,
    CorpusError,
    CorpusSource,
    PhoneSource,
    SourceScan,
    UtteranceRecord,
    check_unique,
    gender_of,
    lacking_gender,
)

KINDS = ("recordings", "supervisions", "cuts")


def find_manifests(root: Path, subset: str | None) -> dict[str, Path]:
    """The manifests in ``root`` by kind (``recordings``, ``supervisions``, ``cuts``): ``<kind>.jsonl[.gz]`` or a
    recipe's ``<prefix>_<kind>[_<subset>].jsonl[.gz]``; two candidates for one kind are an error naming them."""
    if not root.is_dir():
        raise CorpusError(f"Lhotse manifest folder {root} does not exist or is not a directory")
    tail = rf"_{re.escape(subset)}" if subset else ""
    found: dict[str, Path] = {}
    for kind in KINDS:
        pattern = re.compile(rf"(.+_)?{kind}{tail}\.jsonl(\.gz)?")
        matches = sorted(p for p in root.iterdir() if p.is_file() and pattern.fullmatch(p.name))
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise CorpusError(f"{root}: several {kind} manifests ({names}): name one part with --subset")
        if matches:
            found[kind] = matches[0]
    if "cuts" not in found and not {"recordings", "supervisions"} <= set(found):
        have = ", ".join(sorted(p.name for p in root.iterdir() if p.is_file())) or "nothing"
        where = f" for --subset {subset}" if subset else ""
        raise CorpusError(
            f"{root}: no recordings.jsonl.gz + supervisions.jsonl.gz and no cuts.jsonl.gz{where} (found: {have})"
        )
    return found


def _supervisions(lhotse, manifests: dict[str, Path]) -> list[tuple[object, object | None]]:
    """(supervision on its recording's timeline, its recording or None when the id is unknown) of every supervision."""
    try:
        if "cuts" in manifests:
            pairs = []
            for cut in lhotse.load_manifest(manifests["cuts"]):
                if type(cut).__name__ != "MonoCut" or cut.recording is None:
                    raise CorpusError(
                        f"{manifests['cuts']}: cut {cut.id} is a {type(cut).__name__}"
                        f"{' without a recording' if type(cut).__name__ == 'MonoCut' else ''}: neurostat reads cuts "
                        "of one recording (MonoCut)"
                    )
                pairs += [(s.with_offset(cut.start), cut.recording) for s in cut.supervisions]
            return pairs
        recordings = lhotse.load_manifest(manifests["recordings"])
        supervisions = lhotse.load_manifest(manifests["supervisions"])
    except CorpusError:
        raise
    except Exception as e:  # lhotse raises many kinds for a bad manifest
        raise CorpusError(
            f"{', '.join(map(str, manifests.values()))}: cannot read the Lhotse manifests ({e})"
        ) from None
    by_id = {r.id: r for r in recordings}
    return [(s, by_id.get(s.recording_id)) for s in supervisions]


def _source_name(recording) -> str:
    """A recording's one local file, else a description of its sources (for messages and the manifest)."""
    sources = recording.sources
    if len(sources) == 1:
        return str(sources[0].source) if sources[0].type != "memory" else f"lhotse recording {recording.id} (in memory)"
    return f"lhotse recording {recording.id} ({len(sources)} sources)"


class LhotseSource(CorpusSource):
    """``--corpus lhotse``: supervisions of Lhotse manifests, their audio read by Lhotse."""

    layout = "lhotse"

    def scan(self) -> SourceScan:
        lhotse = lhotse_module()
        from lhotse.utils import compute_num_samples

        manifests = find_manifests(self.root, self.subset)
        grids = index_alignments(self.alignments) if self.alignments is not None else {}
        records, skips, genders, no_speaker = [], [], [], 0
        for sup, rec in _supervisions(lhotse, manifests):
            if rec is None:
                message = f"supervision {sup.id}: recording {sup.recording_id} is not in the recordings manifest"
                skips.append(skip_record(sup.id, "unknown-recording", manifests["supervisions"], message))
                continue
            where, sr = _source_name(rec), rec.sampling_rate
            first, n = compute_num_samples(sup.start, sr), compute_num_samples(sup.duration, sr)
            if sup.start < 0 or n <= 0 or first + n > rec.num_samples:
                skips.append(skip_record(sup.id, "outside-recording", where, (
                    f"supervision {sup.id} ({sup.start:.3f}-{sup.end:.3f} s) is not inside recording {rec.id} "
                    f"(0-{rec.duration:.3f} s)")))  # fmt: skip
                continue
            channel = sup.channel if not isinstance(sup.channel, list) or len(sup.channel) != 1 else sup.channel[0]
            if isinstance(channel, list) or (channel is None and rec.num_channels != 1):
                skips.append(skip_record(sup.id, "multichannel-audio", where, (
                    f"supervision {sup.id} is on {rec.num_channels if channel is None else len(channel)} channels; "
                    "neurostat expects mono speech (one channel per supervision)")))  # fmt: skip
                continue
            phones = _phones(sup, grids, manifests)
            if phones is None:
                skips.append(skip_record(sup.id, "missing-alignment", where, f"supervision {sup.id} has no "
                             "alignment['phone'] and no TextGrid in --alignments"))  # fmt: skip
                continue
            audio = AudioRef(where, sup.start, sup.end, rec.to_dict(), channel)
            genders.append(sup.gender)
            no_speaker += sup.speaker is None
            speaker = sup.speaker if sup.speaker is not None else rec.id
            records.append(UtteranceRecord(sup.id, speaker, gender_of(sup.gender), audio, phones))
        records = check_unique(records, str(self.root))
        lacking = lacking_gender(records, genders, "the supervisions' gender is not set")
        if no_speaker:
            lacking["speaker"] = f"{no_speaker} supervisions have no speaker: their recording's id stands for it"
        return SourceScan(records, skips, lacking)


def _phones(sup, grids: dict[str, Path], manifests: dict[str, Path]) -> PhoneSource | None:
    alignment = (sup.alignment or {}).get("phone")
    if alignment:
        intervals = tuple((float(item.start), float(item.end), str(item.symbol)) for item in alignment)
        where = manifests.get("supervisions", manifests.get("cuts"))
        return PhoneSource("inline", f"{where} (supervision {sup.id})", intervals)
    grid = grids.get(sup.id) or grids.get(sup.recording_id)
    return None if grid is None else PhoneSource("textgrid", str(grid))
