"""One rank of a torchrun job: its share into its partial store, then the collective merge; rank 0 writes
the final store (see :mod:`neurostat.engine.distributed` for the shares and the collectives)."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from ..corpus.prepared import PreparedCorpus
from ..store import Progress, StoreError, StoreMeta, StoreWriter, load_done
from .accumulate import Accumulator
from .distributed import (
    JobProgress,
    World,
    all_gather,
    all_reduce,
    balanced_shares,
    check_partials,
    partial_dir,
    partial_path,
    remove_other_partials,
)
from .merge import store_state
from .spec import RunSpec

RunShare = Callable[[StoreWriter, StoreMeta, list[int], JobProgress], StoreMeta]
"""The collect loop over one rank's utterances into its partial store; returns the partial's metadata."""


def collect_rank(
    corpus: PreparedCorpus,
    out: str | Path,
    spec: RunSpec,
    meta: StoreMeta,
    world: World,
    resume: bool,
    overwrite: bool,
    run_share: RunShare,
    coords: dict,
) -> StoreMeta:
    """This rank's share (by duration) through ``run_share``, the ranks' totals combined by each statistic's
    rule, and on rank 0 the final store at ``out`` with ``coords``; returns the final metadata."""
    out = Path(out)
    if world.rank == 0 and (out / "zarr.json").is_file() and not (resume or overwrite):
        raise StoreError(f"{out} already exists: pass --resume to continue it or --overwrite to replace it")
    check_partials(out, world, resume)
    if world.rank == 0 and overwrite and not resume:
        remove_other_partials(out, world)
    indices = list(spec.indices)
    share = balanced_shares([corpus.records[i]["num_samples"] for i in indices], world.size)[world.rank]
    partial = partial_path(out, world)
    job = JobProgress(world, len(indices))
    rank_meta = meta.for_rank(world.rank, world.size)
    try:
        with StoreWriter(partial, rank_meta, resume=resume, overwrite=overwrite) as store:
            mine = run_share(store, rank_meta, [indices[j] for j in share], job)
    except Exception as e:
        tqdm.write(f"{world} failed: {type(e).__name__}: {e}")
        raise
    started = time.time()
    acc = Accumulator.from_state(store_state(partial, spec.stat_names), spec.k, spec.stat_names, spec.policy.device)
    all_reduce(acc)
    ranks = all_gather(
        {"rank": world.rank, "host": platform.node(), "done": load_done(partial), "progress": mine.progress.to_dict()}
    )
    progress = [Progress.from_dict(r["progress"]) for r in ranks]
    total = Progress.total(progress)
    total.utterances_total, total.complete = len(indices), True
    total.elapsed_seconds = max(p.elapsed_seconds for p in progress) + time.time() - started
    total.loop_seconds = max(p.loop_seconds or 0.0 for p in progress)
    final = meta.replace(complete=True, progress=total, distributed=_job_record(out, ranks, progress))
    if world.rank == 0:
        with StoreWriter(out, final, overwrite=True) as store:
            done = [u for r in ranks for u in r["done"]]
            store.finalize(acc.compute(), coords, final, done, dims=spec.dims)
    dist.barrier()
    return final


def _job_record(out: Path, ranks: list[dict], progress: list[Progress]) -> dict:
    """The store's ``distributed`` section: the job, and each rank's host, utterances and timings."""
    return {
        "world_size": len(ranks),
        "backend": dist.get_backend(),
        "sharding": "balanced by duration",
        "partials": str(partial_dir(out).resolve()),
        "ranks": [
            {
                "rank": r["rank"],
                "host": r["host"],
                "utterances": len(r["done"]),
                "audio_seconds": p.audio_seconds,
                "elapsed_seconds": p.elapsed_seconds,
                "loop_seconds": p.loop_seconds or 0,
                "data_wait_seconds": p.data_wait_seconds,
            }
            for r, p in zip(ranks, progress)
        ],
    }
