"""`neurostat collect` on a CPU shared with another job: audio-s/s quiet and beside a busy process, for this
checkout and (``--before``) another, each run a fresh interpreter (the CLI as a user runs it, with its own
defaults: OpenMP's wait policy and torch's threads are decided at start), the checkouts and loads in turns.

The busy process is what "another job" does on a shared machine: a pure-Python loop that keeps
``--hogs`` cores busy (default 1) while the collect runs.  Three loads: ``quiet``; ``loaded``, the busy
processes running before the collect starts (so that it can see them when it picks torch's threads); and
``late``, a job that arrives after the run picked its threads, emulated by the busy processes beside a run
whose threads are fixed at every core (``OMP_NUM_THREADS``): there OpenMP's waits decide the speed.  Each row
is the median over ``--repeat`` rounds; the paired ratios (this / before) are per round and load.

    python bench/contention_bench.py                                # this checkout, quiet and loaded
    python bench/contention_bench.py --before /tmp/neurostat-main   # before/after (a `git archive` of main)
    python bench/contention_bench.py --smoke                        # 2 x 2 utterances, once, no results file
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

from benchutil import emit

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("RESULTS.md")
LOADS = ("quiet", "loaded", "late")


def environment(checkout: Path, work: Path) -> dict:
    """A user's environment (no OpenMP settings of ours) with ``checkout``'s neurostat package first on the
    path: a folder holding only a link to it (the checkout's root would also put its ``kernels`` folder
    before the installed package of that name)."""
    path = work / "path" / checkout.resolve().as_posix().strip("/").replace("/", "_")
    if not path.is_dir():
        path.mkdir(parents=True)
        (path / "neurostat").symlink_to(checkout.resolve() / "neurostat")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    return {**env, "PYTHONPATH": str(path), "HF_HUB_OFFLINE": "1"}


def hogs(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep a core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def collect(checkout: Path, prepared: Path, out: Path, model: str, threads: int | None = None) -> dict:
    """One CLI collect with ``checkout``: audio-s/s of its loop and torch's threads (from the store, or
    ``threads`` where they are fixed by ``OMP_NUM_THREADS``)."""
    command = [sys.executable, "-m", "neurostat", "collect", "--prepared", str(prepared), "--model", model]
    command += ["--tokens", "all", "--out", str(out)]
    env = environment(checkout, out.parent) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    # `python -m` puts the working folder first on the path: run where no neurostat folder is, and check
    where = [sys.executable, "-c", "import neurostat; print(neurostat.__file__)"]
    found = subprocess.run(where, env=env, cwd=out.parent, capture_output=True, text=True, check=True).stdout.strip()
    if Path(found).resolve() != (checkout / "neurostat" / "__init__.py").resolve():
        raise SystemExit(f"the runs of {checkout} would import neurostat from {found}")
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"collect with {checkout} failed:\n{done.stderr[-3000:]}")
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    progress, batching = attrs["progress"], attrs["batching"]
    return {
        "rate": progress["audio_seconds"] / progress["loop_seconds"],
        "threads": threads or batching.get("torch_threads"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", type=int, default=4)
    ap.add_argument("--utterances", type=int, default=6)
    ap.add_argument("--model", default="demo", help="model of the runs (default: the shipped demo model)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each run once per round; medians reported)")
    ap.add_argument("--hogs", type=int, default=1, help="busy processes beside a loaded run")
    ap.add_argument("--before", type=Path, default=None, help="another checkout to measure in turns with this one")
    ap.add_argument("--smoke", action="store_true", help="2 x 2 utterances, once, no results file")
    ap.add_argument("--results", default=str(RESULTS), help="append the table here ('' for none)")
    args = ap.parse_args()
    if args.smoke:
        args.speakers, args.utterances, args.repeat, args.results = 2, 2, 1, ""
    from neurostat.corpus.prepare import PrepareSettings, prepare
    from neurostat.corpus.synth import synthesize
    from neurostat.frames import default_geometry

    checkouts = {"this checkout": ROOT} | ({"--before": args.before} if args.before else {})
    runs: dict[tuple[str, str], list[dict]] = {(c, load): [] for c in checkouts for load in LOADS}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, prepared = work / "corpus", work / "prepared"
        synthesize(corpus, "dev-clean", args.speakers, args.utterances, seed=0, progress=False)
        prepare(corpus / "LibriSpeech", "dev-clean", corpus / "alignments", prepared,
                PrepareSettings(default_geometry()), progress=False)  # fmt: skip
        for r in range(args.repeat):
            order = [(c, load) for load in LOADS for c in checkouts]
            for name, load in order if r % 2 == 0 else order[::-1]:
                busy = hogs(args.hogs) if load != "quiet" else []
                try:
                    time.sleep(0.5 if busy else 0)  # the busy processes running before the collect starts
                    loads.append(os.getloadavg()[0])
                    out = work / f"{r}-{name.replace(' ', '-')}-{load}.zarr"
                    threads = len(os.sched_getaffinity(0)) if load == "late" else None
                    runs[name, load].append(collect(checkouts[name], prepared, out, args.model, threads))
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
                got = runs[name, load][-1]
                print(f"round {r + 1}: {name}, {load}: {got['rate']:.1f} audio-s/s, {got['threads']} threads", flush=True)
    lines = report(args, checkouts, runs, loads)
    emit("\n".join(lines), args.results)


def report(args, checkouts, runs, loads) -> list[str]:
    n = args.speakers * args.utterances
    lines = [
        "",
        f"### contention_bench: CLI collect of {n} synthetic utterances, model {args.model}, --tokens all",
        "",
        f"- machine: {os.uname().machine}, {os.cpu_count()} cores; loaded = beside {args.hogs} busy process(es) "
        "started first; late = beside them with torch's threads fixed at every core (a job that arrives after the "
        f"run picked its threads); {args.repeat} round(s) in turns; load average (1 min) "
        f"{min(loads):.1f}–{max(loads):.1f} at the runs' starts",
        "",
        "| checkout | quiet audio-s/s | loaded audio-s/s | late audio-s/s | loaded / quiet | late / quiet "
        "| torch threads (quiet, loaded, late) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, checkout in checkouts.items():
        quiet, loaded, late = (statistics.median(r["rate"] for r in runs[name, load]) for load in LOADS)
        threads = ", ".join(str(sorted({r["threads"] for r in runs[name, load]}, key=str)) for load in LOADS)
        lines.append(
            f"| {name} ({checkout}) | {quiet:.1f} | {loaded:.1f} | {late:.1f} | {loaded / quiet:.2f} "
            f"| {late / quiet:.2f} | {threads} |"
        )
    if args.before:
        paired = {
            load: statistics.median(
                a["rate"] / b["rate"] for a, b in zip(runs["this checkout", load], runs["--before", load])
            )
            for load in LOADS
        }
        lines += ["", "- paired, the median over rounds of this checkout / --before: "
                  + ", ".join(f"{load} {ratio:.2f}" for load, ratio in paired.items())]  # fmt: skip
    return lines


if __name__ == "__main__":
    main()
