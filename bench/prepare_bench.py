"""`neurostat prepare` on a LibriSpeech-layout corpus, end to end as a user runs it: where one process spends
its time, its audio-seconds per second, the same for another checkout (``--before``), and a torchrun job of
``--nproc`` processes against one process.

Every run is a fresh interpreter whose ``PYTHONPATH`` is the checkout measured, running the `prepare` command
(``-j 1``) into a fresh folder (cold: nothing cached), then again into the same folder (warm: every utterance
cached).  The cold run times its phases by wrapping the functions that do them (the same names in both
checkouts): start-up and imports (until the command starts preparing), audio decode, TextGrid parsing, F0,
the per-utterance cache writes, frame labels (phone by frame, pitch bins), the folder's files, and the rest
(keys of the cache, phone mapping, the scan, the lock).  A round runs each checkout once, in turns (which goes
first alternates), and the torchrun job beside this checkout's single process; the tables give medians over
rounds and the median of each round's paired ratios, which is what survives the load of a shared machine
(stated with the load averages seen).  The folders are compared byte for byte: this checkout's with
``--before``'s (the labels unchanged) and the job's with one process's.

    python bench/prepare_bench.py                                      # this checkout, 6 x 8 utterances
    python bench/prepare_bench.py --before /tmp/neurostat-main         # before/after, e.g. a `git archive` of main
    python bench/prepare_bench.py --speakers 32 --utterances 32 --before /tmp/neurostat-main --repeat 3
    python bench/prepare_bench.py --smoke                              # 2 x 2 utterances, once, no results file
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).with_name("RESULTS.md")
SUBSET = "dev-clean"
LABEL_FILES = ("meta.json", "manifest.jsonl", "skips.jsonl", "frames.npy", "intervals.npy", "index.npy")
"""What collect reads of a prepared folder (the cache ``utts/`` aside)."""
PHASES = ("start-up and imports", "decode", "TextGrid", "F0", "cache writes", "frame labels", "folder files", "rest")


def profiled_prepare(arguments: list[str]) -> dict:
    """Runs `neurostat prepare` (``arguments``) in this interpreter with its phases timed; returns the seconds of
    each from the start of this function, and the neurostat imported."""
    begin = time.perf_counter()
    import neurostat
    import neurostat.corpus.prepare as prepare
    import neurostat.corpus.prepared as prepared
    import neurostat.corpus.source as source

    spent: dict[str, float] = dict.fromkeys(("decode", "TextGrid", "F0", "cache writes", "labels", "create"), 0.0)
    started: list[float] = []

    def timed(name, fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t

        return run

    def prepare_source(*args, **kwargs):
        started.append(time.perf_counter())
        return original(*args, **kwargs)

    original = prepare.prepare_source
    prepare.prepare_source = prepare_source
    source.AudioRef.load = timed("decode", source.AudioRef.load)
    prepare.read_textgrid = timed("TextGrid", prepare.read_textgrid)
    prepare.f0_at = timed("F0", prepare.f0_at)
    write = prepared.PreparedCorpus.write_utterance
    prepared.PreparedCorpus.write_utterance = staticmethod(timed("cache writes", write))
    prepared.phone_frames = timed("labels", prepared.phone_frames)
    prepared.assign_bins = timed("labels", prepared.assign_bins)
    prepared.PreparedCorpus.create = classmethod(timed("create", prepared.PreparedCorpus.create.__func__))
    from neurostat.cli import main

    main(["prepare", *arguments], standalone_mode=False)
    total = time.perf_counter() - begin
    phases = {
        "imports": started[0] - begin,
        "decode": spent["decode"],
        "TextGrid": spent["TextGrid"],
        "F0": spent["F0"],
        "cache writes": spent["cache writes"],
        "frame labels": spent["labels"],
        "folder files": spent["create"] - spent["labels"],
    }
    return {"neurostat": str(Path(neurostat.__file__).parent), "total": total, "phases": phases}


def prepare_arguments(corpus: Path, out: Path, jobs: bool = True) -> list[str]:
    """`prepare`'s arguments: ``-j 1`` (one labelling process), or without ``jobs`` its default workers."""
    root, alignments = corpus / "LibriSpeech", corpus / "alignments"
    arguments = ["--root", str(root), "--subset", SUBSET, "--alignments", str(alignments), "--out", str(out)]
    return arguments + (["-j", "1"] if jobs else [])


def environment(checkout: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_cold(checkout: Path, corpus: Path, out: Path) -> dict:
    """A cold `prepare` with ``checkout`` in a fresh interpreter: wall seconds, CPU seconds and phases."""
    command = [sys.executable, __file__, "--profile", json.dumps(prepare_arguments(corpus, out))]
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, env=environment(checkout), capture_output=True, text=True, cwd=out.parent)
    wall, cpu = time.perf_counter() - start, children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"prepare with {checkout} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["neurostat"]).resolve().is_relative_to(checkout.resolve()):
        raise SystemExit(f"{checkout}: the run imported neurostat from {result['neurostat']}")
    phases = result["phases"]
    phases["start-up and imports"] = wall - result["total"] + phases.pop("imports")
    phases["rest"] = wall - sum(phases.values())
    return {"wall": wall, "cpu": cpu, "phases": phases}


def run_command(checkout: Path, command: list[str], cwd: Path) -> dict:
    """Wall and CPU seconds of ``command`` (a `prepare` or a torchrun job, its processes all counted) with
    ``checkout``."""
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(command, env=environment(checkout), capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed:\n{done.stderr[-3000:]}")
    return {"wall": time.perf_counter() - start, "cpu": children_cpu() - cpu}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_prepare(nproc: int, corpus: Path, out: Path) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    return [sys.executable, *launcher, "-m", "neurostat", "prepare", *prepare_arguments(corpus, out)]


def differing_files(a: Path, b: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """The files of two prepared folders that differ (or exist in one only); ``names``: only these."""

    def contents(folder: Path) -> dict[str, bytes]:
        files = (p for p in folder.rglob("*") if p.is_file())
        return {str(p.relative_to(folder)): p.read_bytes() for p in files if names is None or p.name in names}

    x, y = contents(a), contents(b)
    return sorted(f for f in x.keys() | y.keys() if x.get(f) != y.get(f))


def differences(rounds: list[list[str]]) -> str:
    """Words on the files that differed: how many in each round, and the first few."""
    first = next(files for files in rounds if files)
    return f"{[len(files) for files in rounds]} files in the rounds, e.g. {', '.join(first[:4])}"


def median(values) -> float:
    return statistics.median(list(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", type=int, default=6)
    ap.add_argument("--utterances", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="rounds (each run once per round; medians reported)")
    ap.add_argument("--before", type=Path, default=None, help="another checkout to measure in turns with this one")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the torchrun job (0: no job)")
    ap.add_argument("--machine", default="", help="words on the machine for the results file")
    ap.add_argument("--smoke", action="store_true", help="2 x 2 utterances, once, no results file")
    ap.add_argument("--results", default=str(RESULTS), help="append the tables here ('' for none)")
    ap.add_argument("--profile", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        print(json.dumps(profiled_prepare(json.loads(args.profile))))
        return
    if args.smoke:
        args.speakers, args.utterances, args.repeat, args.results = 2, 2, 1, ""
    import soundfile as sf

    from neurostat.corpus.synth import synthesize

    checkouts = {"this checkout": ROOT} | ({"--before": args.before} if args.before else {})
    cold: dict[str, list[dict]] = {name: [] for name in checkouts}
    warm: dict[str, list[float]] = {name: [] for name in checkouts}
    job: list[dict] = []
    workers: list[dict] = []  # this checkout with its default -j
    loads, unchanged, identical = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        synthesize(corpus, SUBSET, args.speakers, args.utterances, seed=0, progress=False)
        audio = sum(sf.info(f).duration for f in corpus.rglob("*.flac"))
        for r in range(args.repeat):
            loads.append(os.getloadavg()[0])
            order = list(checkouts.items())
            runs = [(name, checkout, "one") for name, checkout in order]
            runs += [("job", ROOT, "job")] if args.nproc > 1 else []
            runs += [("workers", ROOT, "workers")]
            for name, checkout, kind in runs if r % 2 == 0 else runs[::-1]:
                out = work / f"round-{r}-{name.replace(' ', '-')}"
                if kind == "job":
                    job.append(run_command(checkout, torchrun_prepare(args.nproc, corpus, out), work))
                    print(f"round {r + 1}: torchrun {args.nproc} processes {job[-1]['wall']:.2f} s", flush=True)
                    continue
                if kind == "workers":
                    command = [sys.executable, "-m", "neurostat", "prepare", *prepare_arguments(corpus, out, False)]
                    workers.append(run_command(checkout, command, work))
                    print(f"round {r + 1}: default workers {workers[-1]['wall']:.2f} s", flush=True)
                    continue
                cold[name].append(run_cold(checkout, corpus, out))
                warm_command = [sys.executable, "-m", "neurostat", "prepare", *prepare_arguments(corpus, out)]
                warm[name].append(run_command(checkout, warm_command, work)["wall"])
                seconds = f"cold {cold[name][-1]['wall']:.2f} s, warm {warm[name][-1]:.2f} s"
                print(f"round {r + 1}: {name}: {seconds}", flush=True)
            one = work / f"round-{r}-this-checkout"
            if args.before:
                unchanged.append(differing_files(one, work / f"round-{r}---before", LABEL_FILES))
            for other in ["workers"] + (["job"] if args.nproc > 1 else []):
                identical.append(differing_files(work / f"round-{r}-{other}", one))
            loads.append(os.getloadavg()[0])
    lines = report(args, checkouts, cold, warm, {"job": job, "workers": workers}, audio, loads, unchanged, identical)
    from benchutil import emit  # here, not at the top: it imports torch, which the timed children must not

    emit("\n".join(lines), args.results)
    if any(unchanged) or any(identical):
        raise SystemExit("the prepared folders differ (see above)")


def report(args, checkouts, cold, warm, others, audio, loads, unchanged, identical) -> list[str]:
    """The results' tables: one process per checkout, its phases, the torchrun job and the default workers
    against one process, the paired ratios."""
    n = args.speakers * args.utterances
    lines = [
        "",
        f"### prepare_bench: LibriSpeech layout, {n} synthetic utterances ({audio:,.0f} s of audio), -j 1",
        "",
        f"- machine: {args.machine or os.uname().machine + f', {os.cpu_count()} cores'}; {args.repeat} round(s), "
        f"the runs in turns; load average (1 min) {min(loads):.1f}–{max(loads):.1f} during the rounds",
        "",
        "| checkout | prepare, cold s (fresh interpreter) | audio-s/s | CPU s | audio-s per CPU-s | warm (cached) s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, checkout in checkouts.items():
        wall, cpu = median(c["wall"] for c in cold[name]), median(c["cpu"] for c in cold[name])
        lines.append(
            f"| {name} ({checkout}) | {wall:.2f} | {audio / wall:,.0f} | {cpu:.2f} | {audio / cpu:,.0f} | "
            f"{median(warm[name]):.2f} |"
        )
    lines += ["", "Where one cold process spends its time (median seconds over rounds; share of the median wall):", ""]
    lines += ["| phase | " + " | ".join(checkouts) + " |", "| --- |" + " ---: |" * len(checkouts)]
    for phase in PHASES:
        cells = []
        for name in checkouts:
            seconds, wall = median(c["phases"][phase] for c in cold[name]), median(c["wall"] for c in cold[name])
            cells.append(f"{seconds:.2f} ({100 * seconds / wall:.0f} %)")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    if args.before:
        kinds = {
            "cold": {k: [c["wall"] for c in v] for k, v in cold.items()},
            "cold CPU": {k: [c["cpu"] for c in v] for k, v in cold.items()},
            "warm": warm,
        }
        paired = {
            kind: median(a / b for a, b in zip(values["this checkout"], values["--before"]))
            for kind, values in kinds.items()
        }
        same = "byte-identical in every round" if not any(unchanged) else f"DIFFERENT: {differences(unchanged)}"
        lines += [
            "",
            "- paired, the median over rounds of this checkout / --before: "
            + ", ".join(f"{kind} {ratio:.3f}" for kind, ratio in paired.items())
            + f"; the prepared folders (label files, manifest, skips, meta.json): {same}",
        ]
    from neurostat.corpus.prepare import OneProcess, default_prepare_jobs

    one = cold["this checkout"]
    jobs = default_prepare_jobs(args.speakers * args.utterances, OneProcess())
    rows = {
        f"{args.nproc} processes (torchrun, gloo), -j 1 each": others["job"],
        f"1 process, default -j ({jobs} worker{'s' if jobs > 1 else ''})": others["workers"],
    }
    same = "byte-identical (cache included) in every round"
    same = same if not any(identical) else f"DIFFERENT: {differences(identical)}"
    lines += [
        "",
        "| run | wall s | audio-s/s | vs 1 process (paired) | CPU s, all processes | vs 1 process (paired) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| 1 process, -j 1 | {median(o['wall'] for o in one):.2f} | {audio / median(o['wall'] for o in one):,.0f} | "
        f"1.00 | {median(o['cpu'] for o in one):.2f} | 1.00 |",
    ]
    for label, runs in rows.items():
        if not runs:
            continue
        ratio = {k: median(j[k] / o[k] for j, o in zip(runs, one)) for k in ("wall", "cpu")}
        wall, cpu = median(j["wall"] for j in runs), median(j["cpu"] for j in runs)
        lines.append(
            f"| {label} | {wall:.2f} | {audio / wall:,.0f} | {ratio['wall']:.3f} | {cpu:.2f} | {ratio['cpu']:.3f} |"
        )
    lines += ["", f"- these runs' folders against one process's: {same}"]
    return lines


if __name__ == "__main__":
    main()
