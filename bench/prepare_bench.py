"""`neurostat prepare` on a LibriSpeech-layout corpus: its wall time against the bare work it cannot avoid,
and (with ``--before``) the same for another checkout of neurostat, run in turns on the same corpus, with
the median of the paired ratios (this / before) of each round.

The bare work, timed in the same process first: for every utterance, decode the FLAC, read the TextGrid
and track F0 at the frame centres (Praat).  Then `prepare` into a fresh folder (cold: nothing cached) and
again into the same folder (warm: every utterance cached).  Each measurement runs in a fresh interpreter
whose ``PYTHONPATH`` is the checkout measured; ``--before`` checkouts and this one alternate, and the
table gives each one's median over ``--repeat`` rounds.

    python bench/prepare_bench.py                               # this checkout, 6 x 8 utterances
    python bench/prepare_bench.py --before /tmp/neurostat-main  # before/after, e.g. a `git archive` of main
    python bench/prepare_bench.py --smoke                       # 2 x 2 utterances, once, no results file
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("RESULTS.md")
SUBSET = "dev-clean"


def measure(corpus: Path, work: Path) -> dict:
    """Seconds of the bare work, of a cold and of a warm `prepare`, with the neurostat that is imported."""
    import neurostat
    from neurostat.corpus.audio import load_audio
    from neurostat.corpus.pitch import f0_at
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.textgrid import read_textgrid
    from neurostat.frames import default_geometry

    settings = PrepareSettings(default_geometry())
    geo = settings.geometry
    root, alignments = corpus / "LibriSpeech", corpus / "alignments"
    start = time.perf_counter()
    for flac in sorted((root / SUBSET).rglob("*.flac")):
        wave, _, _ = load_audio(flac, geo.sample_rate)
        read_textgrid(next(alignments.rglob(f"{flac.stem}.TextGrid")))
        n = geo.num_frames(len(wave))
        f0_at(
            settings.pitch, wave, geo.sample_rate, geo.centres(n), settings.pitch_step, "time", len(wave) // geo.stride
        )
    bare = time.perf_counter() - start
    out, seconds = work / "prepared", []
    for _ in range(2):  # cold, then warm (cached)
        start = time.perf_counter()
        prepare(root, SUBSET, alignments, out, settings, progress=False)
        seconds.append(time.perf_counter() - start)
    return {"neurostat": str(Path(neurostat.__file__).parent), "bare": bare, "cold": seconds[0], "warm": seconds[1]}


def run_measure(checkout: Path, corpus: Path) -> dict:
    """:func:`measure` in a fresh interpreter that imports neurostat from ``checkout``."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, __file__, "--measure", str(corpus), "--work", work]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"prepare with {checkout} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["neurostat"]).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"{checkout}: the run imported neurostat from {result['neurostat']}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", type=int, default=6)
    ap.add_argument("--utterances", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each checkout once per round; medians reported)")
    ap.add_argument("--before", type=Path, default=None, help="another checkout to measure in turns with this one")
    ap.add_argument("--machine", default="", help="words on the machine for the results file")
    ap.add_argument("--smoke", action="store_true", help="2 x 2 utterances, once, no results file")
    ap.add_argument("--results", default=str(RESULTS), help="append the table here ('' for none)")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.work)))
        return
    if args.smoke:
        args.speakers, args.utterances, args.repeat, args.results = 2, 2, 1, ""
    from neurostat.corpus.synth import synthesize

    checkouts = {"this checkout": ROOT} | ({"--before": args.before} if args.before else {})
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        synthesize(corpus, SUBSET, args.speakers, args.utterances, seed=0, progress=False)
        audio = sum(f.stat().st_size for f in corpus.rglob("*.flac"))
        for r in range(args.repeat):
            order = list(checkouts.items())
            for name, checkout in order if r % 2 == 0 else order[::-1]:
                runs[name].append(run_measure(checkout, corpus))
                print(f"round {r + 1}: {name}: {runs[name][-1]}", flush=True)
    median = {n: {k: statistics.median(x[k] for x in rs) for k in ("bare", "cold", "warm")} for n, rs in runs.items()}
    lines = [
        "",
        f"### prepare_bench: LibriSpeech layout, {args.speakers * args.utterances} synthetic utterances, -j 1",
        "",
        f"- machine: {args.machine or os.uname().machine + f', {os.cpu_count()} cores'}; median of {args.repeat} "
        f"round(s), the checkouts in turns; {audio / 1e6:.1f} MB of FLAC",
        "",
        "| checkout | bare work s | prepare, cold s | prepare, warm (cached) s | cold / bare | warm / bare |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in median.items():
        where = f"{name} ({checkouts[name]})"
        lines.append(
            f"| {where} | {m['bare']:.3f} | {m['cold']:.3f} | {m['warm']:.3f} | {m['cold'] / m['bare']:.3f} | "
            f"{m['warm'] / m['bare']:.3f} |"
        )
    if args.before:  # the load of a shared machine moves both; a round's two runs are minutes apart at most
        paired = {
            k: statistics.median(a[k] / b[k] for a, b in zip(runs["this checkout"], runs["--before"]))
            for k in ("bare", "cold", "warm")
        }
        lines += [
            "",
            "- paired, the median over rounds of this checkout / --before: "
            + ", ".join(f"{k} {v:.3f}" for k, v in paired.items())
            + " (bare: the same code in both, so its spread is the noise)",
        ]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
