"""The collection loop: one pass over a prepared corpus → every statistic of every chosen layer.

Data loading runs in ``-j`` DataLoader workers (:mod:`neurostat.engine.batching`); on the device the
activations of the token frames feed the accumulator inside the FFN forward and are never kept.
Checkpoints are written every ``checkpoint_seconds`` (or ``checkpoint_utterances``) so a crashed or
killed run resumes with counts identical to an uninterrupted one, losing at most one interval; SIGINT
(Ctrl-C) or SIGTERM stops at the next batch boundary after a checkpoint, losing nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..corpus.prepare import PrepareSettings, describe_prepared, prepare_source
from ..corpus.prepared import AudioChangedError, PreparedCorpus
from ..corpus.source import open_source
from ..errors import OptionError
from ..model.adapter import ModelAdapter
from ..model.loading import open_model
from ..store import Progress, StoreMeta, StoreWriter
from .accumulate import Accumulator
from .batching import BatchDataset, padding_fraction, plan_batches
from .device import DevicePolicy, resolve_device
from .distributed import PrepareRanks, World
from .rank import collect_rank
from .spec import CollectConfig, RunSpec

__all__ = ["CollectConfig", "CollectInterrupted", "collect", "collect_corpus", "describe_collect"]


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


def collect(
    corpus: PreparedCorpus,
    adapter: ModelAdapter,
    out,
    config: CollectConfig,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    world: World | None = None,
    policy: DevicePolicy | None = None,
) -> StoreMeta:
    """Runs the pass and writes the store at ``out``; returns its metadata.  ``policy``: the device policy
    the adapter was loaded under (default: resolved from it).  With ``world`` (a rank of a distributed run
    whose process group is initialised) this process collects its share into a partial store and the ranks
    combine their states: see :mod:`neurostat.engine.distributed`."""
    if not config.command:  # called from Python: the store still says what wrote it
        what = f"from Python: collect of {corpus.path} with model {adapter.source} into {out}"
        config = dataclasses.replace(config, command=what)
    spec = RunSpec.resolve(config, adapter, corpus, policy, distributed=world is not None)
    meta = spec.store_meta(corpus)
    if world is None:
        with StoreWriter(out, meta, resume=resume, overwrite=overwrite) as store:
            return _run(corpus, adapter, store, spec, meta, spec.indices, progress)

    def run_share(store, rank_meta, indices, job):
        return _run(corpus, adapter, store, spec, rank_meta, indices, progress, job)

    return collect_rank(corpus, out, spec, meta, world, resume, overwrite, run_share, spec.store_coords(corpus))


@contextmanager
def _threads_beside_workers(threads: int | None) -> Iterator[None]:
    """torch's threads for the run (the device policy's: on a CPU they leave the loading workers their
    cores), then restored."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _interrupted(stop: list[str], job, when: str) -> CollectInterrupted:
    where = "" if job is None else f"{job.world}: "
    why = "" if job is None else " (torchrun stops every rank when one fails: its report names it)"
    return CollectInterrupted(
        f"{where}stopped by {stop[0]}{why} {when}: continue with `neurostat collect ... --resume`"
    )


def _release_inherited(fd: int, worker_id: int) -> None:
    """A data-loading worker closes its copy of the store lock's descriptor: the lock is the run's, and a
    worker outliving a killed run (for a few seconds) must not keep the store locked."""
    os.close(fd)


def _timed_iter(loader, prog: Progress) -> Iterator:
    """Iterates ``loader``, adding the time spent waiting for each item to ``prog.data_wait_seconds``."""
    items = iter(loader)
    while True:
        start = time.perf_counter()
        item = next(items, None)
        prog.data_wait_seconds += time.perf_counter() - start
        if item is None:
            return
        yield item


def _uploaded_ahead(items: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """On a GPU, each batch's waveforms and tokens are copied to the device on a copy stream while the
    previous batch computes (the compute stream waits for the copy's event only when it needs the
    batch); elsewhere the items pass through.  Copies come from the loader's pinned memory."""
    if device.type != "cuda":
        yield from items
        return
    copy, compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)

    def upload(item: dict) -> tuple[dict, torch.cuda.Event]:
        with torch.cuda.stream(copy):
            moved = {**item, "waves": item["waves"].to(device, non_blocking=True), "tokens": item["tokens"].to(device)}
        return moved, copy.record_event()

    def ready(item: dict, copied: torch.cuda.Event) -> dict:
        compute.wait_event(copied)
        for t in (item["waves"], *item["tokens"].tensors()):
            t.record_stream(compute)  # allocated on the copy stream, freed after the compute stream's use
        return item

    ahead = None
    for item in items:
        uploaded = upload(item)
        if ahead is not None:
            yield ready(*ahead)
        ahead = uploaded
    if ahead is not None:
        yield ready(*ahead)


def _restore(spec: RunSpec, adapter: ModelAdapter, store: StoreWriter) -> tuple[Accumulator, list[str], Progress]:
    """The accumulator, the finished utterance ids and the progress: fresh, or from the last checkpoint."""
    policy = spec.policy
    engine = (spec.stat_names, policy.device, spec.backend, adapter.activation_name, spec.precision)
    checkpoint = store.load_checkpoint()
    if checkpoint is None:
        acc = Accumulator(len(spec.entries), spec.space.size, spec.width, spec.k, *engine, spec.top_frames, policy.overlap)
        return acc, [], Progress()
    state, done, prog = checkpoint
    return Accumulator.from_state(state, spec.k, *engine, overlap=policy.overlap), done, prog


def _loader(corpus, adapter, spec: RunSpec, batches, store: StoreWriter) -> torch.utils.data.DataLoader:
    """Batches of waveforms and token labels from the device policy's worker processes."""
    data = BatchDataset(corpus, batches, adapter.feature_extractor, spec.tokens, spec.space, spec.drop_final_run)
    workers = spec.policy.num_jobs
    return torch.utils.data.DataLoader(
        data,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=spec.policy.device.type == "cuda",
        prefetch_factor=4 if workers else None,
        worker_init_fn=functools.partial(_release_inherited, store.lock_fd),
    )


class _Bar:
    """The progress bar: this run's utterances, or (in a torchrun job, on rank 0) the whole job's."""

    def __init__(self, indices, done: list[str], corpus, job, progress: bool):
        self.job = job
        ids = {corpus.records[i]["id"] for i in indices}
        self.bar = tqdm(
            total=len(indices) if job is None else job.utterances,
            initial=len(ids.intersection(done)) if job is None else 0,
            unit="utt",
            desc="collect" if job is None else f"collect ({job.world.size} ranks)",
            disable=not progress or (job is not None and job.world.rank != 0),
            dynamic_ncols=True,
        )

    def show(self, new: int, done: int, prog: Progress, elapsed: float, force: bool = False) -> None:
        elapsed = max(elapsed, 1e-9)
        if self.job is None:
            self.bar.set_postfix_str(
                f"{prog.audio_seconds / 3600:.2f} h audio, {prog.audio_seconds / elapsed:,.1f} audio-s/s, "
                f"waiting for data {100 * prog.data_wait_seconds / elapsed:.0f}%"
            )
            self.bar.update(new)
        elif (whole := self.job.post(done, prog.audio_seconds, force=force)) is not None:
            self.bar.n = whole[0]
            self.bar.set_postfix_str(f"{whole[1] / 3600:.2f} h audio, {whole[1] / elapsed:,.1f} audio-s/s on all ranks")

    def close(self) -> None:
        self.bar.close()


class _Ledger:
    """Which utterances are finished — one cut into pieces by ``max_seconds`` only with its last piece —
    and the progress counts, batch by batch."""

    def __init__(self, corpus: PreparedCorpus, batches, done: list[str], prog: Progress):
        self.done, self.finished, self.prog = done, set(done), prog
        self.pieces_left = Counter(corpus.records[p.index]["id"] for b in batches for p in b)
        self.sample_rate = corpus.geometry.sample_rate

    def count(self, item: dict) -> list[str]:
        """Counts one loaded batch (its skips, frames, tokens and audio); returns the utterances it finished."""
        prog = self.prog
        for err in item["errors"]:
            prog.skip(err["reason"])
            tqdm.write(f"skipped {err['file']}: {err['message']}")
        for u in item["ids"]:
            self.pieces_left[u] -= 1
        new = [u for u in dict.fromkeys(item["ids"]) if self.pieces_left[u] == 0 and u not in self.finished]
        self.finished.update(new)
        self.done.extend(new)
        prog.frames += item["frames"]
        prog.padded_frames += item["padded_frames"]
        prog.tokens += item["tokens"].num_tokens
        prog.audio_seconds += item["samples"] / self.sample_rate
        return new


def _plan(corpus, todo: list[int], spec: RunSpec, progress: bool) -> list:
    """The batches of the utterances still to count, said on the console."""
    batch_seconds = spec.policy.batch_seconds
    batches = plan_batches(corpus, todo, batch_seconds, spec.max_seconds)
    if progress and batches:
        tqdm.write(
            f"{len(batches)} batches of at most {batch_seconds:g} s of padded audio; "
            f"padding {100 * padding_fraction(corpus, batches):.1f}% of the frames"
        )
    return batches


def _run(
    corpus, adapter, store: StoreWriter, spec: RunSpec, meta: StoreMeta, indices, progress: bool, job=None
) -> StoreMeta:
    """The loop: every batch through the instrumented model, checkpoints on the way, then the store."""
    if store.previous is not None and store.previous.complete:
        return store.previous
    acc, done, prog = _restore(spec, adapter, store)
    finished = set(done)
    todo = [i for i in indices if corpus.records[i]["id"] not in finished]
    batches = _plan(corpus, todo, spec, progress)
    ledger = _Ledger(corpus, batches, done, prog)
    position = {entry: i for i, entry in enumerate(spec.entries)}
    current: dict = {}

    def activation(entry: int, ffn, hidden: torch.Tensor) -> torch.Tensor:
        return acc.ffn_activation(position[entry], ffn, hidden, current["tokens"])

    started, last_ckpt, since_ckpt = time.time(), time.time(), 0
    base_elapsed = prog.elapsed_seconds
    bar = _Bar(indices, done, corpus, job, progress)
    if job is not None:
        job.post(len(done), prog.audio_seconds, force=True)

    def save():
        prog.elapsed_seconds, prog.utterances_done = base_elapsed + time.time() - started, len(done)
        store.save_checkpoint(acc.state_dict(), done, prog)

    device = spec.policy.device
    with _stop_requests() as stop, _threads_beside_workers(spec.policy.threads):
        with adapter.instrument(activation, list(spec.entries)):
            for item in _uploaded_ahead(_timed_iter(_loader(corpus, adapter, spec, batches, store), prog), device):
                if item["changed"]:  # before the batch counts: a resume after prepare redoes it
                    save()
                    bar.close()
                    raise AudioChangedError(f"{item['changed'][0]} (the checkpoint of {len(done)} utterances is saved)")
                batch = item["tokens"]
                if batch.num_tokens and len(item["lengths"]):
                    current["tokens"] = batch.to(device)
                    adapter.encode(item["waves"], item["lengths"], front_end=spec.policy.front_end)
                new = ledger.count(item)
                since_ckpt += len(new)
                bar.show(len(new), len(done), prog, base_elapsed + time.time() - started)
                if (
                    spec.checkpoint_utterances and since_ckpt >= spec.checkpoint_utterances
                ) or time.time() - last_ckpt >= spec.checkpoint_seconds:
                    save()
                    last_ckpt, since_ckpt = time.time(), 0
                if stop:
                    save()
                    bar.close()
                    raise _interrupted(
                        stop, job, f"after {len(done)} of {len(indices)} utterances; the checkpoint is saved"
                    )
        if job is not None:
            bar.show(0, len(done), prog, base_elapsed + time.time() - started, force=True)
        bar.close()
        final = _finish(
            store, acc, corpus, spec, meta, ledger, len(indices), lambda: base_elapsed + time.time() - started
        )
        if stop and job is not None:  # a rank must not wait in the merge for ranks torchrun is stopping
            raise _interrupted(stop, job, f"after its last batch; its store of {len(indices)} utterances is complete")
    return final


def _finish(store, acc, corpus, spec: RunSpec, meta: StoreMeta, ledger: _Ledger, total: int, elapsed) -> StoreMeta:
    """Writes the store's arrays and its metadata, marked complete; ``elapsed()``: the run's seconds so far."""
    prog = ledger.prog
    prog.elapsed_seconds = prog.loop_seconds = elapsed()
    prog.utterances_done, prog.utterances_total, prog.complete = len(ledger.done), total, True
    final = meta.replace(complete=True, progress=prog)
    store.finalize(acc.compute(), spec.store_coords(corpus), final, ledger.done, spec.keep_checkpoint, spec.dims)
    prog.elapsed_seconds = elapsed()
    store.update_progress(prog)
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
    dtype: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    preset: str | None = None,
    source_options: dict | None = None,
) -> StoreMeta:
    """What `neurostat collect` does: loads ``model`` (hub id or folder) on ``device``; with ``root`` (a corpus in
    ``layout``, with the ``subset``, ``alignments`` and ``source_options`` it takes: see
    :func:`~neurostat.corpus.source.open_source`) prepares that corpus first (cached, into ``prepared`` or the
    source's default folder, with the model's frame geometry and ``prepare_options`` of
    :meth:`PrepareSettings.from_options`); then collects the prepared corpus into ``out``.
    Under ``torchrun`` (a world size above 1 in the environment) this process joins the job as its rank:
    the ranks prepare the corpus together (see :func:`~neurostat.corpus.prepare.prepare_source`), each rank
    collects its share and rank 0 writes ``out``.
    Returns the store's metadata; ``echo`` gets the prepare summary.  With ``preset`` (whose values
    ``prepare_options`` hold) an already prepared corpus must have been labelled that way."""
    if root is None and prepared is None:
        raise OptionError("give the corpus (--root, --subset, --alignments) or a prepared corpus (--prepared)")
    source = None if root is None else open_source(layout, root, subset, alignments, **(source_options or {}))
    config.check()
    world = World.from_environment()
    if world is not None:
        device = world.device(device)
        world.init(resolve_device(device))
        progress = progress and world.rank == 0
    opened = open_model(model)
    policy = config.resolve_policy(opened.family, device, dtype, opened.source)
    adapter = opened.load(policy.device, policy.dtype)
    if source is not None:
        prepared = prepared or source.default_out()
        settings = PrepareSettings.from_options(adapter.geometry, **(prepare_options or {}))
        ranks = None if world is None else PrepareRanks(world)  # every rank labels its share
        jobs = None if config.num_jobs is None else max(1, config.num_jobs)  # the loaders' -j, if given
        meta = prepare_source(source, prepared, settings, jobs, progress, ranks)
        if echo and (world is None or world.rank == 0):
            echo(describe_prepared(meta, prepared))
    corpus = PreparedCorpus(prepared)
    if preset is not None and root is None:
        differ = PrepareSettings.from_options(adapter.geometry, **(prepare_options or {})).differences(corpus.meta)
        if differ:
            raise OptionError(
                f"{prepared} was not labelled as --preset {preset} asks: {'; '.join(differ)}; prepare it with "
                f"--preset {preset} (or give --root, --subset and --alignments to collect from the corpus)"
            )
    try:
        return collect(corpus, adapter, out, config, resume, overwrite, progress, world, policy)
    finally:
        if world is not None and dist.is_initialized():
            dist.destroy_process_group()


def _design(stats: dict) -> str:
    """`` (<design> label_stats)`` when the run called label_stats, else nothing."""
    chosen = stats.get("label_stats")
    return f" ({chosen['design']} label_stats)" if chosen else ""


def _workers(n: int | None) -> str:
    """The summary's words for the loading workers (stores before they were recorded: none)."""
    if n is None:
        return ""
    return ", loading in the main process" if n == 0 else f", {n} loading worker{'s' if n > 1 else ''}"


def describe_collect(meta: StoreMeta, out: str | Path) -> str:
    """The summary `neurostat collect` prints."""
    p, stats, model = meta.progress, meta.statistics, meta.model
    seconds = max(p.elapsed_seconds, 1e-9)
    skips = dict(meta.corpus.get("prepare_skips", {}))
    for reason, n in p.skips.items():
        skips[reason] = skips.get(reason, 0) + n
    loop = max(p.loop_seconds or seconds, 1e-9)
    padded = max(p.padded_frames, p.frames, 1)
    lines = [
        f"collected {p.counted} utterances, {p.audio_seconds / 3600:.3f} h of audio, "
        f"{p.frames:,} frames, {p.tokens:,} tokens ({stats['tokens']}) in {seconds:.1f} s: "
        f"{p.frames / seconds:,.0f} frames/s, {p.audio_seconds / seconds:.1f} audio-s/s",
        f"waiting for data {100 * p.data_wait_seconds / loop:.0f}% of the loop, computing the rest; "
        f"padding {100 * (1 - p.frames / padded):.1f}% of the frames; {meta.fingerprint.get('dtype', 'float32')} "
        f"model, {meta.batching['front_end']} front end, {model.get('attention', 'eager')} attention"
        + _workers(meta.batching.get("loader_workers")),
        f"statistics: {', '.join(meta.stats)}; k = {meta.k} of {model['width']} "
        f"(λ = {stats['topk_ratio']}); layers {meta.layers[0]}..{meta.layers[-1]}; backend {stats['backend']}"
        f"{_design(stats)}; "
        f"precision {stats.get('precision', 'model').split(':')[0]}",
    ]
    if skips:
        lines.append("skipped: " + ", ".join(f"{r} {n}" for r, n in sorted(skips.items())))
    ranks = (meta.distributed or {}).get("ranks")
    if ranks:
        audio = [r["audio_seconds"] for r in ranks]
        lines.append(
            f"{len(ranks)} ranks ({meta.distributed['backend']}), balanced by duration: {min(audio):,.1f}–"
            f"{max(audio):,.1f} s of audio each, the slowest done in {max(r['elapsed_seconds'] for r in ranks):,.1f} s; "
            f"partial stores in {meta.distributed['partials']}"
        )
    lines.append(f"store: {out}")
    return "\n".join(lines)
