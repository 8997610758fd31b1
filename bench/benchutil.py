"""Shared helpers of the bench scripts: timing, the machine's description, the results file, the
synthetic corpus and model every bench builds, and the paper's per-token loop.

Timing: on CUDA, CUDA events around the call (device time, no host-side noise); on CPU,
``time.perf_counter``.  Each helper takes the device the work runs on.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from neurostat.corpus.prepare import PrepareSettings, prepare
from neurostat.corpus.prepared import PreparedCorpus
from neurostat.corpus.synth import synthesize
from neurostat.engine.batching import BatchDataset, plan_batches
from neurostat.engine.device import default_num_jobs, usable_cores
from neurostat.engine.tokens import token_mask
from neurostat.labelspace import LabelSpace
from neurostat.model.factory import save_model, save_whisper
from neurostat.model.loading import load_geometry
from neurostat.phones import NON_SPEECH

RESULTS = Path(__file__).with_name("RESULTS.md")
TIMING = {"repeat": 10, "warmup": 2}
"""Defaults of :func:`timed` (a ``--smoke`` run sets them to one call and no warm-up)."""


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def once(fn: Callable[[], object], device) -> float:
    """Seconds of one call of ``fn()``, device-synchronised (CUDA events on a GPU)."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(fn: Callable[[], object], device, repeat: int | None = None, warmup: int | None = None) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls (defaults: :data:`TIMING`)."""
    repeat = TIMING["repeat"] if repeat is None else repeat
    for _ in range(TIMING["warmup"] if warmup is None else warmup):
        fn()
    sync(device)
    return statistics.median(once(fn, device) for _ in range(repeat))


def machine(device) -> str:
    """The card, or the CPU with its cores and threads, and the torch version."""
    if is_cuda(device):
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def host_syncs(fn: Callable[[], object], device) -> tuple[int, list[tuple[str, int]]]:
    """On a GPU: how many times ``fn()`` made the host wait for the device (torch's sync debug mode),
    and the five code lines of the package that did it most often (outside it: the nearest caller in
    it); ``(0, [])`` on a CPU, where nothing waits."""
    if not is_cuda(device):
        fn()
        return 0, []
    sites: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "/neurostat/" in f.filename]
        where = frames[-1] if frames else traceback.extract_stack()[-2]
        sites[f"{Path(where.filename).name}:{where.lineno}"] += 1

    previous, show = torch.cuda.get_sync_debug_mode(), warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            warnings.showwarning = show
    return sum(sites.values()), sites.most_common(5)


def emit(text: str, *paths: str | Path | None) -> None:
    """Prints a finished section and appends it to each results file given (at once: nothing is lost
    when a later step times out)."""
    print(text, flush=True)
    for path in filter(None, paths):
        with open(path, "a") as f:
            f.write("\n" + text)


def build_corpus(
    workdir: Path,
    speakers: int,
    utterances: int,
    layers: int | None,
    size: str,
    cache: str | Path | None = None,
    family: str = "hubert",
) -> tuple[PreparedCorpus, Path]:
    """A synthetic corpus prepared in ``workdir`` and a random model of ``family`` (``hubert``, or ``whisper``
    of 30 s windows) and ``size`` with ``layers`` layers (None: a Whisper size's own);
    with ``cache`` (a folder) both are kept there and reused by the next bench that asks for the same sizes
    (synthesising a thousand utterances takes minutes of a lent card's time)."""
    if cache is not None:
        workdir = Path(cache) / f"{family}-{size}-{layers}-layers-{speakers}x{utterances}"
        if (workdir / "built").exists():
            return PreparedCorpus(workdir / "prepared"), workdir / "model"
    if family == "whisper":
        model_dir = save_whisper(workdir / "model", size, **({} if layers is None else {"encoder_layers": layers}))
    else:
        model_dir = save_model(workdir / "model", "hubert", size, num_hidden_layers=layers)
    synthesize(workdir / "corpus", num_speakers=speakers, utterances_per_speaker=utterances, seed=0, progress=False)
    prepare(
        workdir / "corpus" / "LibriSpeech",
        "dev-clean",
        workdir / "corpus" / "alignments",
        workdir / "prepared",
        PrepareSettings(load_geometry(str(model_dir))),
        num_jobs=max(2, usable_cores()),
        progress=False,
    )
    (workdir / "built").touch()
    return PreparedCorpus(workdir / "prepared"), model_dir


def loader_alone(corpus, feature_extractor, batch_seconds: float, tokens: str, workers: int) -> float:
    """Seconds for the DataLoader to deliver every batch (decode, normalise, label), nothing consuming them."""
    batches = plan_batches(corpus, list(range(len(corpus))), batch_seconds, None)
    data = BatchDataset(corpus, batches, feature_extractor, tokens, LabelSpace.of_corpus(corpus))
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers)
    return once(lambda: list(loader), "cpu")


def loader_vs_decode(corpus, feature_extractor, batch_seconds: float, tokens: str, repeat: int) -> dict[str, float]:
    """The loader in this process against a plain soundfile decode of the same files, batch by batch in
    turns (which goes first alternates): the median over batches and repeats of (loader time / decode
    time) per batch, the ratio of the totals, and the audio-seconds per second of each (one worker's rate)."""
    batches = plan_batches(corpus, list(range(len(corpus))), batch_seconds, None)
    data = BatchDataset(corpus, batches, feature_extractor, tokens, LabelSpace.of_corpus(corpus))
    paths = [[corpus.records[p.index]["audio"] for p in batch] for batch in batches]
    data[0]  # warm-up (imports, the page cache)
    ratios, loader, decode = [], 0.0, 0.0
    for r in range(repeat):
        for i in range(len(batches)):
            runs = [lambda: [sf.read(path, dtype="float32") for path in paths[i]], lambda: data[i]]
            times = [once(run, "cpu") for run in (runs if (r + i) % 2 == 0 else runs[::-1])]
            plain, load = times if (r + i) % 2 == 0 else times[::-1]
            ratios.append(load / plain)
            loader, decode = loader + load, decode + plain
    audio = repeat * sum(p.num_samples for batch in batches for p in batch) / corpus.geometry.sample_rate
    return {
        "median": statistics.median(ratios),
        "total": loader / decode,
        "loader": audio / loader,
        "decode": audio / decode,
        "batches": len(batches),
    }


def paper_loop(corpus, adapter, tokens: str, k: int) -> tuple[float, float]:
    """(time of the per-token loop, time of the plain batch-1 forwards it needs)."""
    non_speech = [corpus.phones.index(p) for p in NON_SPEECH]
    space = LabelSpace.of_corpus(corpus)
    record = np.zeros((adapter.num_layers, space.size, adapter.width), dtype=np.int64)
    captured: dict[int, torch.Tensor] = {}
    forward_time = total = 0.0
    for utt in corpus:
        wave = torch.from_numpy(adapter.normalize(utt.load_audio()))
        joint = space.joint_frames(utt)
        frames = np.flatnonzero(token_mask(utt.phone_frames(), tokens, non_speech))
        sync(adapter.device)
        t0 = time.perf_counter()
        with adapter.observe(lambda i, a: captured.__setitem__(i, a)):
            adapter.encode([wave])
        sync(adapter.device)
        t1 = time.perf_counter()
        for t in frames:
            row = joint[t]
            for layer in range(adapter.num_layers):
                idx = torch.topk(captured[layer][0, t].abs(), k).indices.tolist()
                record[layer, row, idx] += 1
        t2 = time.perf_counter()
        forward_time += t1 - t0
        total += t2 - t0
    return total, forward_time


def corpus_arguments(description: str, backend: str = "auto", num_jobs: int | None = None) -> argparse.ArgumentParser:
    """The options the corpus benches share (see :func:`parse`)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="phone-mid", choices=["phone-mid", "all", "no-silence"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backend", default=backend, choices=["auto", "torch", "triton"])
    ap.add_argument("--speakers", type=int, default=4)
    ap.add_argument("--utterances", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="[default: 12; a Whisper's own]")
    ap.add_argument("--batch-seconds", type=float, default=None, help="[default: the engine's for the device]")
    ap.add_argument(
        "-j", "--num-jobs", type=int, default=num_jobs, help="data-loading workers [default: collect's for the device]"
    )
    ap.add_argument("--repeat", type=int, default=2, help="timed repetitions (the best is reported)")
    ap.add_argument("--corpus-dir", default=None, help="keep the synthetic corpus and model here, reuse them if there")
    ap.add_argument("--no-paper", action="store_true", help="skip the paper's loop")
    ap.add_argument("--smoke", action="store_true", help="a tiny model on 2 x 2 utterances, once, no results file")
    ap.add_argument("--results", default=str(RESULTS), help="append the table here ('' for none)")
    return ap


def parse(ap: argparse.ArgumentParser) -> argparse.Namespace:
    """The options; ``--smoke`` shrinks the run to a tiny model on 2 x 2 utterances, once, no results file."""
    args = ap.parse_args()
    args.size = "tiny" if args.smoke else "base"
    if args.layers is None and getattr(args, "family", "hubert") != "whisper":
        args.layers = 12
    if args.num_jobs is None:
        args.num_jobs = default_num_jobs(args.device)
    if args.smoke:
        args.speakers, args.utterances, args.layers, args.repeat, args.results = 2, 2, 2, 1, ""
    return args
