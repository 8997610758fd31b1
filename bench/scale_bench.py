"""Scale-out benchmark: the same `neurostat collect` as one process and as a torchrun job of N processes
(gloo on CPU, NCCL with one GPU per process), the loader alone, the same `neurostat prepare` as one process
and as a torchrun job, and from these the projected wall time of 960 h of audio on 1, 8 and 64 GPUs,
prepare and collect together.

Each run is a subprocess, timed end to end (start-up, the pass, the merge, the store) and by the
store's own loop timings; the job's counts are checked equal to the single process's.  The
projection: 960 h / (GPUs × the per-GPU collect rate × the scaling efficiency measured on GPUs, or
linear where none was: processes on one CPU share its cores, which says nothing of independent GPUs)
plus the measured merge, and the loader workers each GPU needs to keep up (its rate / one worker's
decode rate).  On a CPU the per-GPU
rate is ``--gpu-rate`` (default: the H100 collect_bench run in RESULTS.md); on a card, its own.

Prepare (F0, phones, frame labels: CPU work) runs before collect on the same nodes, every rank labelling with
``--prepare-jobs`` worker processes (collect's ``-j``): 960 h / (GPUs × workers × one worker's labelling rate,
measured here) plus what rank 0 does alone (the folder's files, measured here per audio-second).  The
prepare rows: `neurostat prepare` (``-j 1``) as one process and as a torchrun job of the same processes (gloo),
their folders compared byte for byte.

    python bench/scale_bench.py                              # CPU: 1 vs 2 gloo processes, HuBERT-base geometry
    python bench/scale_bench.py --device cuda --nproc 2      # one node's GPUs: NCCL
    python bench/scale_bench.py --smoke                      # tiny model, 2 x 2 utterances, no results file
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from benchutil import build_corpus, corpus_arguments, emit, loader_alone, machine, parse
from prepare_bench import differing_files, free_port

from neurostat.corpus.prepare import PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus
from neurostat.frames import default_geometry
from neurostat.model.loading import load_adapter

AUDIO_960H = 960 * 3600.0
H100_RATE = 343.3 / 1.218
"""Audio-seconds per second of `collect` on an H100 (collect_bench, bf16, run 2 in RESULTS.md)."""


def run_collect(nproc: int, options: list[str], out: Path) -> tuple[float, dict]:
    """Wall seconds of `neurostat collect` as one process (``nproc`` 1) or a torchrun job, and its attrs."""
    command = [sys.executable, "-m", "neurostat", "collect", *options, "--out", str(out), "--overwrite"]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
        command = [sys.executable, *launcher, *command[1:]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    res = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"collect with {nproc} process(es) failed:\n{res.stderr[-4000:]}")
    return wall, json.loads((out / "zarr.json").read_text())["attributes"]


def run_prepare(nproc: int, corpus: PreparedCorpus, model_dir: Path, out: Path) -> float:
    """Wall seconds of `neurostat prepare -j 1` of the corpus's source as one process (``nproc`` 1) or a torchrun
    job (gloo), with the model's frame geometry (``--model`` only where it is not the default)."""
    meta = corpus.meta
    command = [sys.executable, "-m", "neurostat", "prepare", "--root", meta.root, "--subset", meta.subset]
    command += ["--alignments", meta.alignments, "--out", str(out), "-j", "1"]
    command += [] if corpus.geometry == default_geometry() else ["--model", str(model_dir)]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
        command = [sys.executable, *launcher, *command[1:]]
    start = time.perf_counter()
    res = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"prepare with {nproc} process(es) failed:\n{res.stderr[-4000:]}")
    return time.perf_counter() - start


def prepare_parts(corpus: PreparedCorpus, out: Path) -> tuple[float, float, float]:
    """A prepare in this process (``-j 1``, a fresh folder): (seconds labelling, what every rank shares; seconds
    of the folder's files, what rank 0 does alone once every utterance is labelled, as a fixed part and a part
    per second of audio: the files written again, of the first utterance alone and of all)."""
    meta, create, calls = corpus.meta, PreparedCorpus.create.__func__, []

    def timed_create(cls, *args, **kwargs):
        start = time.perf_counter()
        try:
            return create(cls, *args, **kwargs)
        finally:
            calls.append((time.perf_counter() - start, args, kwargs))

    PreparedCorpus.create = classmethod(timed_create)
    try:
        start = time.perf_counter()
        prepare(meta.root, meta.subset, meta.alignments, out, PrepareSettings(corpus.geometry), progress=False)
        total = time.perf_counter() - start
    finally:
        PreparedCorpus.create = classmethod(create)
    seconds, (_, meta, records, skips, arrays), _ = calls[0]
    rate = corpus.geometry.sample_rate
    (out.parent / "one-utterance").mkdir()
    start = time.perf_counter()
    PreparedCorpus.create(out.parent / "one-utterance", meta, records[:1], skips, arrays[:1])
    fixed = time.perf_counter() - start
    audio = (sum(r["num_samples"] for r in records) - records[0]["num_samples"]) / rate
    return total - seconds, fixed, max(seconds - fixed, 0.0) / audio


def count_differences(a: Path, b: Path) -> dict[str, tuple[int, int]]:
    """Per count variable: (how many counts differ between the stores, in total)."""
    x, y = xr.open_zarr(a, consolidated=False), xr.open_zarr(b, consolidated=False)
    return {
        n: (int(np.abs(x[n].values - y[n].values).sum()), int(y[n].values.sum()))
        for n in ("frames", "topk_count", "positive_count")
    }


def main() -> None:
    ap = corpus_arguments(__doc__, backend="auto", num_jobs=1)
    ap.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes of the torchrun job [default: 2 on CPU, the GPUs on CUDA]; 1 skips the job "
        "(NCCL needs a GPU per process: a one-GPU card measures the per-GPU rate and the loader only)",
    )
    ap.add_argument("--gpu-rate", type=float, default=None, help="per-GPU collect audio-s/s for the projection")
    ap.add_argument(
        "--prepare-jobs",
        type=int,
        default=8,
        help="labelling workers per GPU for the projection (a node's cores over its GPUs; collect --root's -j)",
    )
    args = parse(ap)
    if args.smoke:
        args.num_jobs = 0
    if args.nproc is None:
        args.nproc = torch.cuda.device_count() if args.device.startswith("cuda") else 2
    diff: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus, model_dir = build_corpus(work, args.speakers, args.utterances, args.layers, args.size, args.corpus_dir)
        audio = sum(r["num_samples"] for r in corpus.records) / corpus.geometry.sample_rate
        options = ["--prepared", str(corpus.path), "--model", str(model_dir), "--device", args.device]
        options += ["--dtype", args.dtype, "--backend", args.backend, "--tokens", args.tokens, "-j", str(args.num_jobs)]
        if args.batch_seconds:
            options += ["--batch-seconds", str(args.batch_seconds)]
        wall_1, one = run_collect(1, options, work / "one.zarr")
        if args.nproc > 1:
            wall_n, job = run_collect(args.nproc, options, work / "job.zarr")
            diff = count_differences(work / "job.zarr", work / "one.zarr")
        adapter = load_adapter(str(model_dir))
        batch_seconds = one["batching"]["batch_seconds"]
        load = loader_alone(corpus, adapter.feature_extractor, batch_seconds, args.tokens, 0)
        prep_1 = run_prepare(1, corpus, model_dir, work / "prepared-one")
        prep_n = run_prepare(args.nproc, corpus, model_dir, work / "prepared-job") if args.nproc > 1 else None
        prepared_alike = prep_n is None or not differing_files(work / "prepared-job", work / "prepared-one")
        labelling, folder_fixed, folder_rate = prepare_parts(corpus, work / "parts" / "prepared")

    loop_1 = one["progress"]["loop_seconds"]
    rate_1, decode = audio / loop_1, audio / load
    gpu = args.device.startswith("cuda")
    per_gpu = rate_1 if gpu else (args.gpu_rate or H100_RATE)
    source = "measured here" if gpu else ("--gpu-rate" if args.gpu_rate else "the H100 collect_bench run")
    lines = [
        "",
        f"### scale_bench: {args.nproc} process(es) vs 1, {args.device}, {args.dtype}, tokens {args.tokens}",
        "",
        f"- machine: {machine(args.device)}",
        f"- model: random HuBERT-{args.size} geometry, {args.layers} layers; corpus: {len(corpus)} synthetic "
        f"utterances, {audio:.1f} s; batches of {batch_seconds:g} s; -j {args.num_jobs}",
        "",
        "| run | wall s (end to end) | loop s (slowest rank) | audio-s/s (loop) | vs 1 process |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| 1 process | {wall_1:.2f} | {loop_1:.2f} | {rate_1:,.1f} | 1.00 |",
    ]
    efficiency, merge = 1.0, 0.0
    if args.nproc > 1:
        ranks = job["distributed"]["ranks"]
        loop_n = max(r["loop_seconds"] for r in ranks)
        rate_n = audio / loop_n
        efficiency = rate_n / (args.nproc * rate_1)
        merge = job["progress"]["elapsed_seconds"] - max(r["elapsed_seconds"] for r in ranks)
        lines.append(
            f"| {args.nproc} processes (torchrun, {job['distributed']['backend']}) | {wall_n:.2f} | {loop_n:.2f} | "
            f"{rate_n:,.1f} | {rate_n / rate_1:.2f} |"
        )
    lines.append(f"| loader alone, 1 worker (decode, normalise, label) | {load:.2f} | | {decode:,.1f} | |")
    lines.append(f"| prepare, 1 process (`neurostat prepare -j 1`) | {prep_1:.2f} | | {audio / prep_1:,.1f} | 1.00 |")
    if prep_n is not None:
        lines.append(
            f"| prepare, {args.nproc} processes (torchrun, gloo) | {prep_n:.2f} | | {audio / prep_n:,.1f} | "
            f"{prep_1 / prep_n:.2f} |"
        )
    lines.append("")
    label_rate = audio / labelling
    lines.append(
        "- prepare: the job's folder "
        + ("is byte for byte one process's (the cache included)" if prepared_alike else "DIFFERS from one process's")
        + f"; in one process (in the interpreter, so no start-up) labelling {labelling:.2f} s ({label_rate:,.1f} "
        f"audio-s/s, every rank's part) and the folder's files {folder_fixed:.3f} s + {1e6 * folder_rate:.1f} µs "
        "per audio-second (rank 0's part alone)"
    )
    if args.nproc > 1:
        rank_loops = ", ".join(f"{r['loop_seconds']:.2f}" for r in ranks)
        rank_audio = ", ".join(f"{r['audio_seconds']:.1f}" for r in ranks)
        lines.append(
            f"- scaling efficiency {100 * efficiency:.0f}% (rank loops {rank_loops} s over {rank_audio} s of audio; "
            f"the collective merge and the store {merge:.2f} s); "
            f"counts of the job that differ from the single process's: "
            + ", ".join(f"{n} {d:,} of {t:,}" for n, (d, t) in diff.items())
            + (
                " (in float32 the two batch the utterances differently, and rounding moves neurons at the k-th value; "
                "float64 runs agree exactly: tests/test_distributed.py)"
                if args.dtype != "float64"
                else ""
            )
        )
    else:
        lines.append("- no multi-process run (one process asked, or one GPU: NCCL needs a GPU per process)")
    # processes on one CPU share the cores one process already uses: their efficiency says nothing of GPUs,
    # which are independent (balanced shares: the slowest holds at most one utterance more than the mean)
    scaling = min(1.0, efficiency) if gpu and args.nproc > 1 else 1.0
    hours = [(AUDIO_960H / (g * per_gpu * scaling) + merge) / 3600 for g in (1, 8, 64)]
    how = "the measured" if gpu and args.nproc > 1 else "linear (independent GPUs)"
    lines.append(
        f"- projected 960 h at {per_gpu:,.0f} audio-s/s per GPU ({source}), {how} scaling "
        f"({100 * scaling:.0f}%), plus the merge; {math.ceil(per_gpu / decode)} loader worker(s) per GPU keep up "
        f"(one decodes {decode:,.0f} audio-s/s here): 1 GPU {hours[0]:.2f} h; 8 GPUs {hours[1]:.2f} h; "
        f"64 GPUs {hours[2]:.2f} h"
    )
    prepare_hours = [
        (AUDIO_960H / (g * args.prepare_jobs * label_rate) + folder_fixed + AUDIO_960H * folder_rate) / 3600
        for g in (1, 8, 64)
    ]
    lines.append(
        f"- projected 960 h, prepare then collect: prepare with {args.prepare_jobs} labelling workers per GPU at "
        f"{label_rate:,.0f} audio-s/s each (one worker here), linear, plus rank 0's folder files "
        f"({(folder_fixed + AUDIO_960H * folder_rate) / 60:.1f} min at the rates measured here; not counted: "
        "torchrun's start-up, seconds, and the gather of every rank's labels to rank 0, ~1.4 GB for 960 h): "
        + "; ".join(
            f"{g} GPU{'s' if g > 1 else ''} {p:.2f} h + {c:.2f} h = {p + c:.2f} h"
            for g, p, c in zip((1, 8, 64), prepare_hours, hours)
        )
    )
    if not prepared_alike:
        raise SystemExit("\n".join(lines) + "\nthe torchrun prepare wrote another folder than one process")
    if diff and diff["frames"][0]:
        raise SystemExit("\n".join(lines) + "\nthe job counted other tokens than the single process")
    emit("\n".join(lines) + "\n", args.results)


if __name__ == "__main__":
    main()
