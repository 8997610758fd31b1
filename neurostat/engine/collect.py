"""The collection loop: one pass over a prepared corpus → every statistic of every chosen layer.

Data loading runs in ``-j`` DataLoader workers (:mod:`neurostat.engine.batching`); on the device the
activations of the token frames feed the accumulator inside the FFN forward and are never kept.
Checkpoints are written every ``checkpoint_seconds`` (or ``checkpoint_utterances``) so a crashed or
killed run resumes with counts identical to an uninterrupted one, losing at most one interval; SIGINT
(Ctrl-C) or SIGTERM stops at the next batch boundary after a checkpoint, losing nothing.
"""

from __future__ import annotations

import functools
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..version import __version__
from ..corpus.prepare import PrepareSettings, default_prepared_dir, describe_prepared, prepare
from ..corpus.prepared import PreparedCorpus
from ..errors import OptionError
from ..labelspace import LabelSpace
from ..model.adapter import FRONT_ENDS, ModelAdapter, ModelError, default_front_end, resolve_device
from ..store import FORMAT as STORE_FORMAT
from ..store import StoreError, StoreWriter, load_done
from .accumulate import Accumulator
from .backends import PRECISIONS, make_backend, resolve_backend
from .batching import BatchDataset, default_batch_seconds, padding_fraction, plan_batches
from .distributed import (
    JobProgress,
    World,
    all_gather,
    all_reduce,
    balanced_shares,
    check_partials,
    partial_dir,
    partial_path,
    rank_zero_first,
    remove_other_partials,
)
from .merge import store_state, summed_progress
from .statistics import DEFAULT_STATS, TABLE, Params, statistics, store_dims
from .tokens import MODES


@dataclass
class CollectConfig:
    stats: tuple[str, ...] = DEFAULT_STATS
    topk_ratio: float = 0.01
    tokens: str = "phone-mid"
    drop_final_run: bool = False  # the paper's code never counts an utterance's last run of frames
    layers: list[int] | None = None  # 1-based, as everywhere a user sees layers; None = all
    batch_seconds: float | None = None  # padded audio per batch; None: default_batch_seconds(device)
    front_end: str | None = None  # batched or per-utterance; None: default_front_end(device)
    max_seconds: float | None = None
    checkpoint_seconds: float = 300.0
    checkpoint_utterances: int | None = None
    keep_checkpoint: bool = False  # keep the last checkpoint's state beside the complete store
    shard: tuple[int, int] = (0, 1)
    num_jobs: int = 0
    backend: str = "auto"
    stats_precision: str = "fp32"  # fp32: statistics of the fp32-accumulated activations in bf16/fp16 runs
    top_frames: int = 16  # N of the top_frames statistic (when collected)
    labels: tuple[str, ...] | None = None  # label parts of the joint label; None = every part of the corpus
    command: str = field(default_factory=lambda: shlex.join(sys.argv))  # shell-quoted, as info prints it


class CollectInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run at a batch boundary, after a checkpoint."""


@contextmanager
def _stop_requests() -> Iterator[list[str]]:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current batch (the list gets the
    signal's name); a second SIGINT interrupts at once."""
    requests: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def handler(signum, frame):
        if requests and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requests.append(signal.Signals(signum).name)
        tqdm.write(f"{requests[-1]}: stopping after this batch (Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requests
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _check_state_size(num_layers: int, space: LabelSpace, width: int, stats: tuple[str, ...], device) -> None:
    """Refuses a joint label space whose dense state would not fit in the device's free memory."""
    per_cell = sum(TABLE[s].dtype.itemsize * len(TABLE[s].states) for s in stats)
    need = num_layers * space.size * width * per_cell
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.7 * free:
        shape = " × ".join(f"{len(space.vocab(p))} {p}" for p in space.parts)
        raise ValueError(
            f"the joint label space ({shape} = {space.size} labels) needs {need / 2**30:.1f} GiB of state for "
            f"{num_layers} layers × {width} neurons, more than the {free / 2**30:.1f} GiB free on {device}; "
            f"choose fewer label parts with --labels, fewer --layers or fewer --stat"
        )


def _versions() -> dict:
    import transformers
    import zarr

    return {
        "neurostat": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "zarr": zarr.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def collect(
    corpus: PreparedCorpus,
    adapter: ModelAdapter,
    out,
    config: CollectConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    world: World | None = None,
) -> dict:
    """Runs the pass and writes the store at ``out``; returns the run summary.  With ``world`` (a rank of
    a distributed run whose process group is initialised) this process collects its share into a partial
    store and the ranks combine their states: see :mod:`neurostat.engine.distributed`."""
    adapter.check_geometry(corpus.geometry)
    if config.tokens not in MODES:
        raise ValueError(f"unknown token mode {config.tokens!r}; choose one of {MODES}")
    if not 0 < config.topk_ratio <= 1:
        raise ValueError(f"--topk-ratio must be in (0, 1] (k = round(λ·D) neurons of D), got {config.topk_ratio}")
    if not config.top_frames >= 1:
        raise ValueError(f"--top-frames must be at least 1, got {config.top_frames}")
    if config.batch_seconds is not None and not config.batch_seconds > 0:
        raise ValueError(f"--batch-seconds must be positive, got {config.batch_seconds}")
    config.stats = tuple(s.name for s in statistics(config.stats))
    config.batch_seconds = config.batch_seconds or default_batch_seconds(adapter.device)
    config.front_end = config.front_end or default_front_end(adapter.device)
    if config.front_end not in FRONT_ENDS:
        raise ValueError(f"unknown front end {config.front_end!r}; choose from {FRONT_ENDS}")
    config.backend = resolve_backend(config.backend, adapter.device)
    if config.stats_precision not in PRECISIONS:
        raise ValueError(f"unknown --stats-precision {config.stats_precision!r}; choose from {PRECISIONS}")
    try:
        make_backend(config.backend, statistics(config.stats), Params(1), str(adapter.config.hidden_act))
    except ValueError as e:
        raise ModelError(f"{adapter.source}: {e}") from None
    layers = list(range(adapter.num_layers)) if config.layers is None else sorted({i - 1 for i in config.layers})
    bad = [i + 1 for i in layers if not 0 <= i < adapter.num_layers]
    if bad:
        raise ModelError(f"{adapter.source} has layers 1..{adapter.num_layers}; no layer {bad}")
    width = adapter.width
    k = max(1, round(config.topk_ratio * width))
    space = LabelSpace.of_corpus(corpus, config.labels)
    corpus.check_label_sets(space.parts)
    corpus.check_audio()
    _check_state_size(len(layers), space, width, config.stats, adapter.device)
    shard_i, shard_n = config.shard
    indices = [i for i in range(len(corpus)) if i % shard_n == shard_i]
    if world is not None and shard_n > 1:
        raise OptionError("--shard splits the corpus by hand; a torchrun job splits it over its ranks: use one")

    fingerprint = {
        "model": adapter.source,
        "revision": adapter.revision,
        "weights": adapter.weights,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "stats_precision": config.stats_precision,
        "stats": list(config.stats),
        "top_frames": config.top_frames if "top_frames" in config.stats else None,
        "topk_ratio": config.topk_ratio,
        "k": k,
        "tokens": config.tokens,
        "drop_final_run": config.drop_final_run,
        "layers": [i + 1 for i in layers],
        "labels": space.to_dict(),
        "label_sets": {name: corpus.label_sets[name]["file"] for name in space.parts if name in corpus.label_sets},
        "pitch_edges": corpus.edges,
        "pitch_rule": corpus.meta["pitch"]["rule"],
        "frame_labels": corpus.meta["frame_labels"],
        "corpus": {
            "root": corpus.meta["root"],
            "subset": corpus.meta["subset"],
            "prepared": str(corpus.path.resolve()),
        },
        "shard": f"{shard_i}/{shard_n}",
        "max_seconds": config.max_seconds,
    }
    attrs = {
        "neurostat_store_format": STORE_FORMAT,
        "neurostat_version": __version__,
        "complete": False,
        "fingerprint": fingerprint,
        "model": adapter.describe(),
        "statistics": {
            "stats": list(config.stats),
            "topk_ratio": config.topk_ratio,
            "k": k,
            "top_frames": config.top_frames if "top_frames" in config.stats else None,
            "tokens": config.tokens,
            "drop_final_run": config.drop_final_run,
            "ties": "lower neuron index wins at the k-th |a|",
            "var_ddof": 0,
            "moments": "per-batch fp32 sums around a per-neuron shift, merged in float64 (Chan et al.)",
            "merge": {var: TABLE[name].rule for name in config.stats for var in TABLE[name].store},
            "backend": config.backend,
            "precision": _describe_precision(config.stats_precision, adapter.dtype),
        },
        "labels": space.to_dict(),
        "label_sets": {
            name: {k: v for k, v in entry.items() if k != "vocab"}
            for name, entry in corpus.label_sets.items()
            if name in space.parts
        },
        "pitch": corpus.meta["pitch"],
        "frame_labels": corpus.meta["frame_labels"],
        "phone_map": corpus.meta["phone_map"],
        "corpus": {
            **fingerprint["corpus"],
            "utterances": len(indices),
            "shard": fingerprint["shard"],
            "prepare_skips": corpus.skips,
        },
        "batching": {
            "front_end": config.front_end,
            "group_norm": "statistics per utterance over its valid positions",
            "transformer": f"batched with a boolean frame mask, {adapter.attention} attention",
            "max_seconds": config.max_seconds,
            "batch_seconds": config.batch_seconds,
        },
        "versions": _versions(),
        "command": config.command,
    }
    if world is None:
        with StoreWriter(out, attrs, resume=resume, overwrite=overwrite) as store:
            return _run(corpus, adapter, store, config, space, layers, k, indices, attrs, progress)
    return _run_rank(corpus, adapter, out, config, space, layers, k, indices, attrs, progress, world, resume, overwrite)


def _run_rank(corpus, adapter, out, config, space, layers, k, indices, attrs, progress, world, resume, overwrite):
    """One rank's share into its partial store, then the collective merge; rank 0 writes ``out``."""
    out = Path(out)
    if world.rank == 0 and (out / "zarr.json").is_file() and not (resume or overwrite):
        raise StoreError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    check_partials(out, world, resume)
    if world.rank == 0 and overwrite and not resume:
        remove_other_partials(out, world)
    share = balanced_shares([corpus.records[i]["num_samples"] for i in indices], world.size)[world.rank]
    part = f"rank {world.rank} of {world.size}"
    rank_attrs = {
        **attrs,
        "fingerprint": {**attrs["fingerprint"], "shard": part},
        "corpus": {**attrs["corpus"], "utterances": len(share), "shard": part},
        "distributed": {"world_size": world.size, "rank": world.rank, "sharding": "balanced by duration"},
    }
    partial = partial_path(out, world)
    job = JobProgress(world, len(indices))
    try:
        with StoreWriter(partial, rank_attrs, resume=resume, overwrite=overwrite) as store:
            mine = _run(
                corpus, adapter, store, config, space, layers, k, [indices[j] for j in share], rank_attrs, progress, job
            )
    except Exception as e:
        tqdm.write(f"{world} failed: {type(e).__name__}: {e}")
        raise
    started = time.time()
    stats = tuple(config.stats)
    acc = Accumulator.from_state(store_state(partial, stats), k, stats, adapter.device)
    all_reduce(acc)
    ranks = all_gather(
        {
            "rank": world.rank,
            "host": platform.node(),
            "done": load_done(partial),
            "progress": mine["progress"],
        }
    )
    prog = summed_progress([r["progress"] for r in ranks])
    prog.update(
        utterances_total=len(indices),
        complete=True,
        elapsed_seconds=max(r["progress"]["elapsed_seconds"] for r in ranks) + time.time() - started,
        loop_seconds=max(r["progress"].get("loop_seconds", 0.0) for r in ranks),
    )
    final = {
        **attrs,
        "complete": True,
        "progress": prog,
        "distributed": {
            "world_size": world.size,
            "backend": dist.get_backend(),
            "sharding": "balanced by duration",
            "partials": str(partial_dir(out).resolve()),
            "ranks": [
                {"rank": r["rank"], "host": r["host"], "utterances": len(r["done"])}
                | {key: r["progress"].get(key, 0) for key in _TIMINGS}
                for r in ranks
            ],
        },
    }
    if world.rank == 0:
        with StoreWriter(out, final, overwrite=True) as store:
            done = [u for r in ranks for u in r["done"]]
            store.finalize(acc.compute(), _coords(corpus, layers, space, stats), final, done, dims=store_dims(stats))
    dist.barrier()
    return final


_TIMINGS = ("audio_seconds", "elapsed_seconds", "loop_seconds", "data_wait_seconds")


def _coords(corpus, layers, space: LabelSpace, stats) -> dict[str, np.ndarray]:
    """The store's coordinates: layers (1-based), the label parts of each joint label and, with the top
    frames, the corpus's utterance ids (``top_utterance`` indexes them)."""
    coords = {"layer": np.asarray([i + 1 for i in layers], dtype=np.int64), **space.names()}
    if "top_frames" in stats:
        coords["utterance"] = np.asarray([r["id"] for r in corpus.records], dtype=str)
    return coords


def _interrupted(stop: list[str], job, when: str) -> CollectInterrupted:
    where = "" if job is None else f"{job.world}: "
    why = "" if job is None else " (torchrun stops every rank when one fails: its report names it)"
    return CollectInterrupted(
        f"{where}stopped by {stop[0]}{why} {when}: continue with `neurostat collect ... --resume`"
    )


def _describe_precision(precision: str, dtype: torch.dtype) -> str:
    model = str(dtype).replace("torch.", "")
    if dtype == torch.float32:
        return f"{precision}: the model's {model} activations"
    if precision == "fp32":
        return f"fp32: the FFN activations accumulated in fp32 before rounding to the model's {model}"
    return f"model: the {model} activations the model computes (ties at the k-th |a| are frequent)"


def _release_inherited(fd: int, worker_id: int) -> None:
    """A data-loading worker closes its copy of the store lock's descriptor: the lock is the run's, and a
    worker outliving a killed run (for a few seconds) must not keep the store locked."""
    os.close(fd)


def _timed_iter(loader, prog: dict) -> Iterator:
    """Iterates ``loader``, adding the time spent waiting for each item to ``prog["data_wait_seconds"]``."""
    items = iter(loader)
    while True:
        start = time.perf_counter()
        item = next(items, None)
        prog["data_wait_seconds"] += time.perf_counter() - start
        if item is None:
            return
        yield item


def _run(
    corpus, adapter, store: StoreWriter, config, space: LabelSpace, layers, k, indices, attrs, progress, job=None
) -> dict:
    if store.previous is not None and store.previous.get("complete"):
        return store.previous
    device = adapter.device
    act = str(adapter.config.hidden_act)
    engine = (config.stats, device, config.backend, act, config.stats_precision)
    acc = Accumulator(len(layers), space.size, adapter.width, k, *engine, config.top_frames)
    done: list[str] = []
    prog = {
        "utterances_done": 0,
        "frames": 0,
        "padded_frames": 0,
        "tokens": 0,
        "audio_seconds": 0.0,
        "elapsed_seconds": 0.0,
        "data_wait_seconds": 0.0,
        "skips": {},
    }
    checkpoint = store.load_checkpoint()
    if checkpoint is not None:
        state, done, prog = checkpoint
        acc = Accumulator.from_state(state, k, *engine)
    finished = set(done)
    todo = [i for i in indices if corpus.records[i]["id"] not in finished]
    batches = plan_batches(corpus, todo, config.batch_seconds, config.max_seconds)
    pieces_left = Counter(corpus.records[p.index]["id"] for b in batches for p in b)  # done only with its last piece
    if progress and batches:
        tqdm.write(
            f"{len(batches)} batches of at most {config.batch_seconds:g} s of padded audio; "
            f"padding {100 * padding_fraction(corpus, batches):.1f}% of the frames"
        )
    data = BatchDataset(corpus, batches, adapter.feature_extractor, config.tokens, space, config.drop_final_run)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=config.num_jobs,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if config.num_jobs else None,
        worker_init_fn=functools.partial(_release_inherited, store.lock_fd),
    )
    position = {layer: i for i, layer in enumerate(layers)}
    current: dict = {}

    def activation(layer: int, ffn, hidden: torch.Tensor) -> torch.Tensor:
        return acc.ffn_activation(position[layer], ffn, hidden, current["tokens"])

    started, last_ckpt, since_ckpt = time.time(), time.time(), 0
    base_elapsed = prog["elapsed_seconds"]
    sr = corpus.geometry.sample_rate
    bar = tqdm(
        total=len(indices) if job is None else job.utterances,
        initial=len(finished & {corpus.records[i]["id"] for i in indices}) if job is None else 0,
        unit="utt",
        desc="collect" if job is None else f"collect ({job.world.size} ranks)",
        disable=not progress or (job is not None and job.world.rank != 0),
        dynamic_ncols=True,
    )
    if job is not None:
        job.post(len(done), prog["audio_seconds"], force=True)

    def save():
        prog["elapsed_seconds"] = base_elapsed + time.time() - started
        prog["utterances_done"] = len(done)
        store.save_checkpoint(acc.state_dict(), done, prog)

    with _stop_requests() as stop:
        with adapter.instrument(activation, layers):
            for item in _timed_iter(loader, prog):
                for err in item["errors"]:
                    prog["skips"][err["reason"]] = prog["skips"].get(err["reason"], 0) + 1
                    tqdm.write(f"skipped {err['file']}: {err['message']}")
                batch = item["tokens"]
                if batch.num_tokens and len(item["lengths"]):
                    current["tokens"] = batch.to(device)
                    adapter.encode(item["waves"], item["lengths"], front_end=config.front_end)
                for u in item["ids"]:
                    pieces_left[u] -= 1
                new = [u for u in dict.fromkeys(item["ids"]) if pieces_left[u] == 0 and u not in finished]
                finished.update(new)
                done.extend(new)
                prog["frames"] += item["frames"]
                prog["padded_frames"] += item["padded_frames"]
                prog["tokens"] += batch.num_tokens
                prog["audio_seconds"] += item["samples"] / sr
                since_ckpt += len(new)
                elapsed = base_elapsed + time.time() - started
                if job is None:
                    bar.set_postfix_str(
                        f"{prog['audio_seconds'] / 3600:.2f} h audio, {prog['audio_seconds'] / max(elapsed, 1e-9):,.1f} "
                        f"audio-s/s, waiting for data {100 * prog['data_wait_seconds'] / max(elapsed, 1e-9):.0f}%"
                    )
                    bar.update(len(new))
                elif (whole := job.post(len(done), prog["audio_seconds"])) is not None:
                    bar.n = whole[0]
                    bar.set_postfix_str(
                        f"{whole[1] / 3600:.2f} h audio, {whole[1] / max(elapsed, 1e-9):,.1f} audio-s/s on all ranks"
                    )
                if (
                    config.checkpoint_utterances and since_ckpt >= config.checkpoint_utterances
                ) or time.time() - last_ckpt >= config.checkpoint_seconds:
                    save()
                    last_ckpt, since_ckpt = time.time(), 0
                if stop:
                    save()
                    bar.close()
                    raise _interrupted(
                        stop, job, f"after {len(done)} of {len(indices)} utterances; the checkpoint is saved"
                    )
        if job is not None and (whole := job.post(len(done), prog["audio_seconds"], force=True)) is not None:
            bar.n = whole[0]
            bar.refresh()
        bar.close()
        prog["elapsed_seconds"] = prog["loop_seconds"] = base_elapsed + time.time() - started
        prog["utterances_done"] = len(done)
        arrays = acc.compute()
        coords = _coords(corpus, layers, space, config.stats)
        final = {**attrs, "complete": True, "progress": {**prog, "utterances_total": len(indices), "complete": True}}
        store.finalize(arrays, coords, final, done, config.keep_checkpoint, store_dims(config.stats))
        final["progress"]["elapsed_seconds"] = base_elapsed + time.time() - started
        store.update_attrs({"progress": final["progress"]})
        if stop and job is not None:  # a rank must not wait in the merge for ranks torchrun is stopping
            raise _interrupted(stop, job, f"after its last batch; its store of {len(indices)} utterances is complete")
    return final


def collect_corpus(
    model: str,
    out: str | Path,
    config: CollectConfig,
    prepared: str | Path | None = None,
    root: str | Path | None = None,
    subset: str | None = None,
    alignments: str | Path | None = None,
    layout: str = "librispeech",
    prepare_options: dict | None = None,
    device: str = "auto",
    dtype: str = "float32",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict:
    """What `neurostat collect` does: loads ``model`` (hub id or folder) on ``device``; with ``root``,
    ``subset`` and ``alignments`` (a corpus in ``layout``) prepares that corpus first (cached, into ``prepared`` or the default
    folder, with the model's frame geometry and ``prepare_options`` of
    :meth:`PrepareSettings.from_options`); then collects the prepared corpus into ``out``.
    Under ``torchrun`` (a world size above 1 in the environment) this process joins the job as its rank:
    rank 0 prepares first, each rank collects its share and rank 0 writes ``out``.
    Returns the run summary; ``echo`` gets the prepare summary."""
    if root is None and prepared is None:
        raise OptionError("give the corpus (--root, --subset, --alignments) or a prepared corpus (--prepared)")
    missing = [name for name, v in (("--subset", subset), ("--alignments", alignments)) if v is None]
    if root is not None and missing:
        raise OptionError(f"{' and '.join(missing)} needed to label the corpus at {root}")
    world = World.from_environment()
    if world is not None:
        device = world.device(device)
        world.init(resolve_device(device))
        progress = progress and world.rank == 0
    adapter = ModelAdapter.load(model, device=resolve_device(device), dtype=getattr(torch, dtype))
    if root is not None:
        prepared = prepared or default_prepared_dir(alignments, subset)
        settings = PrepareSettings.from_options(adapter.geometry, **(prepare_options or {}))
        jobs = max(1, config.num_jobs)
        meta = rank_zero_first(
            world, lambda: prepare(root, subset, alignments, prepared, settings, jobs, progress, layout)
        )
        if echo and (world is None or world.rank == 0):
            echo(describe_prepared(meta, prepared))
    try:
        return collect(PreparedCorpus(prepared), adapter, out, config, resume, overwrite, progress, world)
    finally:
        if world is not None and dist.is_initialized():
            dist.destroy_process_group()


def describe_collect(attrs: dict, out: str | Path) -> str:
    """The summary `neurostat collect` prints."""
    p, stats = attrs["progress"], attrs["statistics"]
    seconds = max(p["elapsed_seconds"], 1e-9)
    layers = attrs["fingerprint"]["layers"]
    skips = dict(attrs["corpus"].get("prepare_skips", {}))
    for reason, n in p.get("skips", {}).items():
        skips[reason] = skips.get(reason, 0) + n
    loop = max(p.get("loop_seconds", seconds), 1e-9)
    padded = max(p.get("padded_frames", 0), p["frames"], 1)
    lines = [
        f"collected {p['utterances_done'] - sum(p.get('skips', {}).values())} utterances, "
        f"{p['audio_seconds'] / 3600:.3f} h of audio, "
        f"{p['frames']:,} frames, {p['tokens']:,} tokens ({stats['tokens']}) in {seconds:.1f} s: "
        f"{p['frames'] / seconds:,.0f} frames/s, {p['audio_seconds'] / seconds:.1f} audio-s/s",
        f"waiting for data {100 * p.get('data_wait_seconds', 0) / loop:.0f}% of the loop, computing the rest; "
        f"padding {100 * (1 - p['frames'] / padded):.1f}% of the frames; {attrs['batching']['front_end']} front end, "
        f"{attrs['model'].get('attention', 'eager')} attention",
        f"statistics: {', '.join(stats['stats'])}; k = {stats['k']} of {attrs['model']['width']} "
        f"(λ = {stats['topk_ratio']}); layers {layers[0]}..{layers[-1]}; backend {stats['backend']}; "
        f"precision {stats.get('precision', 'model').split(':')[0]}",
    ]
    if skips:
        lines.append("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(skips.items())))
    ranks = attrs.get("distributed", {}).get("ranks")
    if ranks:
        audio = [r["audio_seconds"] for r in ranks]
        lines.append(
            f"{len(ranks)} ranks ({attrs['distributed']['backend']}), balanced by duration: {min(audio):,.1f}–"
            f"{max(audio):,.1f} s of audio each, the slowest done in {max(r['elapsed_seconds'] for r in ranks):,.1f} s; "
            f"partial stores in {attrs['distributed']['partials']}"
        )
    lines.append(f"store: {out}")
    return "\n".join(lines)
