"""``neurostat browse``: a static neuron browser — an index searchable by layer, neuron and property, and
one page per neuron with its P(j | phone) profile, its gender and pitch contrasts, the properties it
belongs to and its top frames as playable audio (± ``context`` seconds around each frame, with the
frame's phone, speaker and F0; each utterance's audio is one FLAC file the pages play windows of).  No server: open ``index.html``, or serve the folder with
``python -m http.server``.  Needs a store collected with ``--top-frames`` and the prepared corpus it
was collected from.
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

import numpy as np
import soundfile as sf

from .corpus.prepared import PreparedCorpus
from .files import check_out_folder, has_page
from .neuronset import NeuronSet
from .report import ReportError
from .select import property_sets
from .stats import Stats, open_stats

_STYLE = """body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px}input{font-size:1.1em;width:30em}.bar{fill:#4c72b0}"""


class BrowseError(ReportError):
    """A store or corpus the browser cannot be made from; the message says why."""


def _neurons(stats: Stats, sets: dict[str, NeuronSet], every: bool) -> list[tuple[int, int]]:
    if every:
        return [(layer, j) for layer in stats.layers for j in range(stats.width)]
    chosen = {(layer, j) for s in sets.values() for layer in s.layers for j in s[layer] if layer in stats.layers}
    return sorted(chosen)


def _profile_svg(labels: list[str], values: np.ndarray, chance: float) -> str:
    """A bar chart of P(j | label) as inline SVG (one <rect> per label, its value in a tooltip)."""
    width, height, bar = 12 * len(labels) + 40, 160, 10
    top = max(float(np.nanmax(values)) if np.isfinite(values).any() else 0.0, chance, 1e-9)
    bars = []
    for i, (label, v) in enumerate(zip(labels, values)):
        h = 0.0 if not np.isfinite(v) else 120 * v / top
        x = 30 + 12 * i
        bars.append(
            f'<rect class="bar" x="{x}" y="{130 - h:.1f}" width="{bar}" height="{h:.1f}">'
            f"<title>{html.escape(label)}: {v:.3f}</title></rect>"
            f'<text x="{x + 5}" y="142" font-size="7" text-anchor="end" transform="rotate(-90 {x + 5} 142)">'
            f"{html.escape(label)}</text>"
        )
    line = 130 - 120 * chance / top
    return (
        f'<svg id="profile" width="{width}" height="{height}" role="img" aria-label="P(j | phone)">'
        + "".join(bars)
        + f'<line x1="25" x2="{width}" y1="{line:.1f}" y2="{line:.1f}" stroke="black" stroke-dasharray="3"/>'
        f'<text x="0" y="{line - 2:.1f}" font-size="8">chance</text></svg>'
    )


def _contrast(prob, part: str, i: int, j: int) -> str:
    """P(j | label of ``part``) of neuron j in layer position i, as a small table."""
    cells = "".join(
        f"<tr><td>{html.escape(str(label))}</td><td>{float(prob.values[i, c, j]):.3f}</td></tr>"
        for c, label in enumerate(prob[part].values)
    )
    return f'<h3>P(j | {part})</h3><table class="contrast" data-part="{part}">{cells}</table>'


class _Audio:
    """The audio of the top frames: each utterance any page lists written once, as FLAC
    (``audio/<utterance>.flac``), and each top frame a window of it that the page plays through a media
    fragment (``#t=start,end``, ± ``context`` s): the site holds at most the corpus's audio, however many
    neurons list an utterance.  An utterance's audio is decoded once, to write its file; its phones and F0
    are read once while neurons share it (an LRU cache)."""

    def __init__(self, corpus: PreparedCorpus, out: Path, context: float):
        self.corpus, self.out, self.context = corpus, out, context
        self.index = {r["id"]: i for i, r in enumerate(corpus.records)}
        self.written: dict[str, str] = {}  # utterance id -> file name
        self.windows = 0
        self.utterance = functools.lru_cache(maxsize=64)(self._read)

    def _read(self, utterance: str):
        """(the utterance, its phone per frame, its F0 per frame)."""
        utt = self.corpus[self.index[utterance]]
        return utt, utt.phone_frames(self.corpus.geometry), utt.f0

    def window(self, utterance: str, seconds: float) -> str:
        """The page's ``src`` of ± ``context`` s around ``seconds`` of ``utterance`` (its file written once)."""
        utt, rate = self.utterance(utterance)[0], self.corpus.geometry.sample_rate
        if utterance not in self.written:
            name = _file_name(utterance, set(self.written.values()))
            sf.write(self.out / name, utt.load_audio(), rate, subtype="PCM_16")
            self.written[utterance] = name
        length = utt.record["num_samples"] / rate
        start, end = max(0.0, seconds - self.context), min(length, seconds + self.context)
        self.windows += 1
        return f"{self.written[utterance]}#t={start:.3f},{end:.3f}"

    @property
    def bytes(self) -> int:
        return sum((self.out / name).stat().st_size for name in self.written.values())


def _file_name(utterance: str, taken: set[str]) -> str:
    """A FLAC file name for an utterance id (other characters than letters, digits, ``-``, ``_`` and ``.``
    replaced, a number added where that makes two ids one name)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", utterance) or "utterance"
    name, n = f"{stem}.flac", 1
    while name in taken:
        n += 1
        name = f"{stem}~{n}.flac"
    return name


TITLE = "<title>neurostat neuron browser</title>"
"""The title of a browser's ``index.html``: what marks a folder as a browser that may be rewritten."""


def is_browser(folder: Path) -> bool:
    """Whether ``folder`` holds a neuron browser written by :func:`build_browser`."""
    return has_page(folder, TITLE)


def build_browser(
    store: str | Path,
    corpus: str | Path | None,
    out: str | Path,
    neuron_files: list[Path] | None = None,
    every: bool = False,
    sigma: float = 0.8,
    context: float = 0.5,
    allow_other_model: bool = False,
) -> dict:
    """Writes the site into ``out`` (new, empty or a browser, apart from the inputs: see
    :func:`neurostat.files.check_out_folder`); returns how many neuron pages, audio windows (top frames) and
    audio files (utterances, FLAC) it holds, and the audio's bytes.
    ``corpus``: the prepared corpus the store was collected from (None: the one the store records)."""
    stats = open_stats(store)
    if corpus is None:
        corpus = stats.meta.corpus.get("prepared")
        if corpus is None or not Path(corpus).is_dir():
            where = f"names {corpus}, which is not there" if corpus else "does not record it"
            raise BrowseError(f"{store} {where}: give the prepared corpus it was collected from with --prepared")
    out = check_out_folder(out, "neuron browser", is_browser, (store, corpus, *(neuron_files or [])))
    if "top_value" not in stats.ds:
        raise BrowseError(f"{store} has no top frames; collect with --top-frames to hear what drives each neuron")
    prepared = PreparedCorpus(corpus)
    known = {r["id"] for r in prepared.records}
    ids = [str(u) for u in stats.ds["utterance"].values.tolist()]
    missing = [u for u in ids if u not in known]
    if missing:
        raise BrowseError(
            f"{corpus} lacks {len(missing)} of the {len(ids)} utterances of {store} (first: {missing[0]}); give the "
            "prepared corpus the store was collected from"
        )
    differ = stats.corpus_differences(prepared.content_digests(stats.parts))
    if differ:
        raise BrowseError(
            f"{corpus} is not the prepared corpus {store} was collected from, though the utterance ids match "
            f"({'; '.join(differ)}); give the prepared corpus the store was collected from"
        )
    sets = property_sets(stats, list(neuron_files or []), sigma, allow_other_model)
    neurons = _neurons(stats, sets, every)
    (out / "neurons").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(exist_ok=True)
    audio = _Audio(prepared, out / "audio", context)
    prob = {
        part: stats.probability("topk", by=(part,)) for part in ("phone", "gender", "pitch_bin") if part in stats.parts
    }
    rows = []
    for layer, j in neurons:
        member = [name for name, s in sets.items() if j in s[layer]]
        top = stats.top_frames(layer, j)
        page = _neuron_page(stats, prepared, audio, prob, layer, j, member, top)
        (out / "neurons" / f"L{layer}-{j}.html").write_text(page)
        rows.append((layer, j, member, top[0]["value"] if top else float("nan")))
    (out / "index.html").write_text(_index_page(stats, rows))
    return {"pages": len(rows), "windows": audio.windows, "audio_files": len(audio.written), "audio_bytes": audio.bytes}


def _neuron_page(stats, corpus, audio, prob, layer, j, member, top) -> str:
    esc = html.escape
    i, name = stats.layers.index(layer), esc(stats.names[layer])
    profile = ""
    if "phone" in prob:
        labels = [str(p) for p in prob["phone"]["phone"].values]
        profile = "<h2>P(j | phone)</h2>" + _profile_svg(labels, prob["phone"].values[i, :, j], stats.chance)
    contrasts = "".join(_contrast(prob[part], part, i, j) for part in ("gender", "pitch_bin") if part in prob)
    frames = []
    for rank, t in enumerate(top, 1):
        utt, phone_ids, f0s = audio.utterance(t["utterance"])
        f = t["frame"]
        phone = corpus.phones[phone_ids[f]] if 0 <= f < len(phone_ids) and phone_ids[f] >= 0 else "—"
        f0 = f0s[f] if f < len(f0s) else np.nan
        src = audio.window(t["utterance"], t["seconds"])
        frames.append(
            f"<tr><td>{rank}</td><td>{t['value']:.4f}</td><td>{esc(t['utterance'])}</td>"
            f"<td>{esc(utt.speaker)} ({esc(utt.gender)})</td><td>{t['seconds']:.2f} s</td><td>{esc(phone)}</td>"
            f"<td>{'unvoiced' if not np.isfinite(f0) or f0 <= 0 else f'{f0:.0f} Hz'}</td>"
            f'<td><audio controls preload="none" src="../audio/{esc(src)}"></audio></td></tr>'
        )
    props = ", ".join(esc(m) for m in member) or "none of the shown properties"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>layer {name}, neuron {j}</title><style>{_STYLE}</style></head>
<body><p><a href="../index.html">all neurons</a></p><h1>Layer {name}, neuron {j}</h1>
<p>Properties: <span id="properties">{props}</span></p>
{profile}{contrasts}
<h2>Top frames</h2><p>The largest activations over the corpus, ±{audio.context:g} s of audio around each frame.</p>
<table id="top-frames"><tr><th>#</th><th>a</th><th>utterance</th><th>speaker</th><th>time</th><th>phone</th>
<th>F0</th><th>listen</th></tr>{"".join(frames)}</table></body></html>
"""


def _index_page(stats: Stats, rows) -> str:
    esc = html.escape
    body = "".join(
        f'<tr data-search="l{name} {name}/{j} n{j} {esc(" ".join(member).lower())}"><td>{name}</td><td>{j}</td>'
        f"<td>{esc(', '.join(member))}</td><td>{value:.4f}</td>"
        f'<td><a href="neurons/L{layer}-{j}.html">open</a></td></tr>'
        for layer, j, member, value in rows
        for name in [esc(stats.names[layer])]
    )
    m = stats.meta.model
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{TITLE}<style>{_STYLE}</style></head>
<body><h1>Neuron browser</h1>
<p>{esc(m["model"])}: {len(rows)} neurons. Search by layer (<code>l3</code>), neuron (<code>3/42</code> or
<code>n42</code>) or property (<code>gender</code>); words must all match.</p>
<input id="search" type="search" placeholder="l3 gender" autofocus> <span id="shown">{len(rows)}</span> shown
<table id="neurons"><tr><th>layer</th><th>neuron</th><th>properties</th><th>largest a</th><th></th></tr>{body}</table>
<script>
const box = document.getElementById("search");
function filter() {{
  const words = box.value.toLowerCase().split(/\\s+/).filter(w => w);
  let shown = 0;
  for (const row of document.querySelectorAll("#neurons tr[data-search]")) {{
    const keys = row.dataset.search.split(" ");
    const ok = words.every(w => keys.some(k => k === w || (w.length > 2 && k.startsWith(w))));
    row.style.display = ok ? "" : "none";
    shown += ok;
  }}
  document.getElementById("shown").textContent = shown;
}}
box.addEventListener("input", filter);
box.value = decodeURIComponent(location.hash.slice(1));
filter();
</script></body></html>
"""
