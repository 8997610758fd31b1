"""The device policy: every setting a run derives from its device, decided here once
(:meth:`DevicePolicy.resolve`) and recorded in the store (:meth:`DevicePolicy.record`): the device, the
model's dtype, the front end, the statistics backend, the padded audio per batch, the data-loading
workers, torch's threads beside them, and whether the statistics run on a side stream.  A setting the
caller gives is taken (and checked); ``auto`` or None is this module's default for the device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..choices import MODEL_DTYPES
from ..machine import idle_cores, usable_cores
from ..model.families import Family, ModelError
from ..model.frontend import resolve_front_end
from .backends import resolve_backend
from .overlap import resolve_overlap


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        why = "a CPU-only build" if torch.version.cuda is None else "no GPU visible"
        raise ModelError(f"--device {device}: this torch sees no CUDA device ({why}); use --device cpu or auto")
    return resolved


def model_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The torch dtype of a ``--dtype`` name (one of :data:`~neurostat.choices.MODEL_DTYPES`), or for
    ``auto`` the fast one on ``device``: bfloat16 on a GPU that computes it natively (compute capability
    8 and up), float16 on an older one, float32 on a CPU.  Half precision is safe for the statistics:
    they see the fp32-accumulated activations (``--stats-precision fp32``)."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        device = torch.device(device)
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    if name not in MODEL_DTYPES:
        raise ModelError(f"--dtype {name!r} is not a model dtype; choose from auto, {', '.join(MODEL_DTYPES)}")
    return getattr(torch, name)


def default_batch_seconds(device: torch.device | str) -> float:
    """Padded audio per batch: 160 s on a GPU (it needs large batches), 20 s on a CPU (large batches
    thrash its caches: 160 s made collect 1.45-1.85x its forward on 2 cores, 20 s about 1.2x)."""
    return 160.0 if torch.device(device).type == "cuda" else 20.0


def default_num_jobs(device: torch.device | str) -> int:
    """Data-loading workers when ``-j`` is not given.  On a GPU as many as the cores allow, up to 12, with
    two cores left to the main process (a worker decodes a few hundred audio-s/s; the card eats
    thousands).  On a CPU the forward wants every core: with 4 cores or fewer the main process loads
    (loading is about 1 % of a CPU run; a worker beside torch's threads made collect 1.45x its forward on
    2 cores, against 1.09x without), above that one worker, and torch gets the other cores
    (:func:`forward_threads`)."""
    cores = usable_cores()
    if torch.device(device).type == "cuda":
        return max(1, min(12, cores - 2))
    return 0 if cores <= 4 else 1


def forward_threads(device: torch.device | str, num_jobs: int) -> int | None:
    """torch's intra-op threads for a CPU run: the cores this process may use, less the ``num_jobs``
    loading workers and the cores other processes keep busy as the run starts (:func:`idle_cores`), at
    least one.  A thread whose core another job holds stalls every parallel region of the others: on 2
    cores beside a busy job, 1 thread collected 85 audio-s/s and 2 threads 57 (36 with GNU OpenMP's default
    spin count; see ``neurostat/__init__.py``).
    None: leave torch's own choice (a GPU run, or ``OMP_NUM_THREADS`` set by the user)."""
    if torch.device(device).type == "cuda" or "OMP_NUM_THREADS" in os.environ:
        return None
    cores = usable_cores() - num_jobs
    idle = idle_cores()
    if idle is not None:
        cores = min(cores, round(idle))
    return max(1, cores)


@dataclass(frozen=True)
class DevicePolicy:
    """What a run does on its device, every value resolved (see the module docstring)."""

    device: torch.device
    dtype: torch.dtype
    front_end: str
    backend: str
    batch_seconds: float
    num_jobs: int
    threads: int | None  # torch's intra-op threads during the run; None: torch's own choice
    overlap: bool  # the statistics on a side stream

    @classmethod
    def resolve(
        cls,
        family: Family,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        front_end: str = "auto",
        backend: str = "auto",
        batch_seconds: float | None = None,
        num_jobs: int | None = None,
        source: str = "model",
    ) -> DevicePolicy:
        """The policy for a model of ``family`` on ``device``; each argument left ``auto``/None takes the
        device's default, each given one is checked (one clear error)."""
        device = resolve_device(device)
        jobs = default_num_jobs(device) if num_jobs is None else int(num_jobs)
        return cls(
            device=device,
            dtype=model_dtype(dtype, device),
            front_end=resolve_front_end(family, front_end, device, source),
            backend=resolve_backend(backend, device),
            batch_seconds=float(batch_seconds or default_batch_seconds(device)),
            num_jobs=jobs,
            threads=forward_threads(device, jobs),
            overlap=resolve_overlap(None, device),
        )

    def record(self) -> dict:
        """The store's record of the policy."""
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "front_end": self.front_end,
            "backend": self.backend,
            "batch_seconds": self.batch_seconds,
            "loader_workers": self.num_jobs,
            "torch_threads": self.threads,
            "statistics_stream": "a side stream" if self.overlap else "the model's stream",
        }
