"""Scale-out under ``torchrun``: ranks, duration-balanced shares, partial stores and the collective merge.

``torchrun --nproc-per-node N -m neurostat collect ...`` starts N processes (``--nnodes`` and
``--rdzv-endpoint`` span machines).  Each rank takes a share of the utterances balanced by duration —
deterministic from the corpus, so the same world size gives the same shares — and collects it into
its own partial store beside the output (``OUT.ranks/rank-R-of-N.zarr``: one writer each,
checkpointed, resumable with ``--resume``).  At the end the ranks combine their states with
all-reduces, each statistic by its merge rule (counts summed as int64, maxima by max, moments pooled
in float64: Σ n·mean first, then Σ M2 + n·(mean − pooled)² — not a mean of means; the top frames
gathered and the N largest kept), and rank 0 writes the final store.  ``neurostat merge`` of the partials gives the same store offline.

``torchrun ... -m neurostat prepare`` (and ``collect --root``, which prepares first) labels the corpus with
every rank: :class:`PrepareRanks` gives :func:`neurostat.corpus.prepare.prepare_source` the job's object
broadcasts and gathers (over gloo: a side group beside NCCL) and its shared counters (the rendezvous store).
This module imports torch only when a function needs it, so that a single process (``World.from_environment``
is None) never does.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import UserError

if TYPE_CHECKING:
    import torch

    from .accumulate import Accumulator

_REDUCE_OPS = {"sum": "SUM", "max": "MAX"}
TIMEOUT = timedelta(hours=6)
"""How long a collective waits for the other ranks (rank 0 writes a whole prepared corpus while they wait)."""
T = TypeVar("T")


class WorldError(UserError):
    """A distributed run that cannot start or resume as asked; the message says why."""


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run."""

    rank: int
    size: int
    local_rank: int = 0
    local_size: int = 1  # the job's processes on this machine

    @classmethod
    def from_environment(cls) -> "World | None":
        """The world ``torchrun`` describes in the environment; None for a single process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size < 2:
            return None
        env = os.environ
        local_size = max(1, int(env.get("LOCAL_WORLD_SIZE", "1")))
        return cls(int(env["RANK"]), size, int(env.get("LOCAL_RANK", "0")), local_size)

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def device(self, device: str) -> str:
        """The device of this rank: ``cuda`` (or ``auto`` with CUDA) becomes ``cuda:LOCAL_RANK``."""
        import torch

        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def init(self, device: torch.device) -> None:
        """Joins the process group (NCCL on CUDA, gloo on CPU) unless the caller already has."""
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.size, timeout=TIMEOUT)


def balanced_shares(durations: Sequence[float], size: int) -> list[list[int]]:
    """Positions 0..n−1 split into ``size`` shares of nearly equal total duration: longest first, each to
    the share with the least so far (ties to the lower position and the lower rank).  Deterministic; the
    totals of any two shares differ by at most the longest duration."""
    if size < 1:
        raise ValueError(f"need at least one share, got {size}")
    order = sorted(range(len(durations)), key=lambda i: (-durations[i], i))
    loads = [(0.0, rank) for rank in range(size)]
    shares: list[list[int]] = [[] for _ in range(size)]
    for i in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(i)
        heapq.heappush(loads, (load + durations[i], rank))
    return [sorted(share) for share in shares]


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ranks")


def partial_path(out: str | Path, world: World) -> Path:
    """Where ``world``'s rank keeps its partial store."""
    return partial_dir(out) / f"rank-{world.rank:03d}-of-{world.size:03d}.zarr"


def check_partials(out: str | Path, world: World, resume: bool) -> None:
    """Refuses to resume partials made with another world size (their shares differ)."""
    folder = partial_dir(out)
    ours = f"-of-{world.size:03d}.zarr"
    others = sorted(p.name for p in folder.glob("rank-*-of-*.zarr") if not p.name.endswith(ours))
    if others and resume:
        size = int(others[0].removesuffix(".zarr").rsplit("-", 1)[1])
        raise WorldError(
            f"{folder} holds the partial stores of a run with {size} processes ({others[0]}, ...), and this run "
            f"has {world.size}: each world size splits the corpus differently, so resume with {size} processes "
            f"(torchrun --nnodes x --nproc-per-node = {size}), or start over with --overwrite"
        )


def remove_other_partials(out: str | Path, world: World) -> None:
    """Rank 0 of an ``--overwrite`` run drops partial stores left by runs with another world size."""
    ours = f"-of-{world.size:03d}.zarr"
    for p in partial_dir(out).glob("rank-*-of-*.zarr"):
        if not p.name.endswith(ours):
            shutil.rmtree(p)


def all_reduce(acc: Accumulator) -> None:
    """Combines every rank's accumulator in place (each statistic by its rule) with collectives."""
    import torch
    import torch.distributed as dist

    def reduce(tensor: torch.Tensor, op: str):
        if op == "gather":
            out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(out, tensor.contiguous())
            return out
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, _REDUCE_OPS[op]))

    acc.all_reduce(reduce)


def all_gather(value) -> list:
    """Every rank's ``value`` (picklable), in rank order."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


class JobProgress:
    """Each rank posts its progress to the rendezvous store (at most once a second); rank 0 reads them
    all, so its progress bar shows the whole job."""

    def __init__(self, world: World, utterances: int, interval: float = 1.0):
        import torch.distributed as dist

        self.world, self.utterances, self.interval = world, utterances, interval
        self.store = dist.distributed_c10d._get_default_store()
        self.last = 0.0

    def _key(self, rank: int) -> str:
        return f"neurostat/progress/{rank}"

    def post(self, utterances: int, audio_seconds: float, force: bool = False) -> tuple[int, float] | None:
        """Posts this rank's totals; on rank 0 returns the whole job's (utterances, audio seconds)."""
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return None
        self.last = now
        self.store.set(self._key(self.world.rank), json.dumps([utterances, audio_seconds]))
        if self.world.rank != 0:
            return None
        done, seconds = 0, 0.0
        for rank in range(self.world.size):
            if self.store.check([self._key(rank)]):
                u, s = json.loads(self.store.get(self._key(rank)))
                done, seconds = done + u, seconds + s
        return done, seconds


class PrepareRanks:
    """torchrun's ranks as ``prepare`` uses them (:class:`neurostat.corpus.prepare.Ranks`): broadcasts and
    gathers of objects over gloo (the job's group, or a gloo side group when the job runs NCCL, whose object
    collectives go through GPU memory) and counters in the rendezvous store, which every node reaches."""

    def __init__(self, world: World):
        import torch
        import torch.distributed as dist

        self.rank, self.size, self.local_size = world.rank, world.size, world.local_size
        self._dist, self._joined = dist, not dist.is_initialized()
        if self._joined:  # `neurostat prepare` under torchrun: the job's group is gloo's
            world.init(torch.device("cpu"))
        self._group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=TIMEOUT)
        self._store = dist.distributed_c10d._get_default_store()

    def broadcast(self, value: T) -> T:
        box = [value]
        self._dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]

    def gather(self, value) -> list | None:
        out = [None] * self.size if self.rank == 0 else None
        self._dist.gather_object(value, out, dst=0, group=self._group)
        return out

    def add(self, key: str, amount: int) -> int:
        return self._store.add(f"neurostat/{key}", amount)

    def close(self) -> None:
        """Leaves the job's group if joining it was this object's doing (``collect`` leaves its own)."""
        if self._joined and self._dist.is_initialized():
            self._dist.destroy_process_group()
