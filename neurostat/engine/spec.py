"""A collect run's settings (:class:`CollectConfig`, what the caller asks for) and its :class:`RunSpec`: every
value the run uses, resolved once against the model, the corpus and the device policy
(:class:`~neurostat.engine.device.DevicePolicy`) and validated in one place; the spec holds only resolved
values, never the caller's config.  The store's metadata and its fingerprint are built here, from the spec
alone (:meth:`RunSpec.store_meta`)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import numpy as np
import torch

from ..choices import FRONT_ENDS
from ..corpus.prepared import PreparedCorpus
from ..declarations import DEFAULT_STATS, store_dims
from ..errors import OptionError
from ..labelspace import LabelSpace
from ..model.adapter import ModelAdapter
from ..model.families import Family, ModelError
from ..store import StoreMeta
from ..version import __version__
from .backends import PRECISIONS, ROUTE_BOUND, Backend, DesignChoice, choose_design, make_backend
from .device import DevicePolicy
from .statistics import Params, Statistic, statistics
from .tokens import MODES


@dataclass
class CollectConfig:
    stats: tuple[str, ...] = DEFAULT_STATS
    topk_ratio: float = 0.01
    tokens: str = "phone-mid"
    drop_final_run: bool = False  # the paper's code never counts an utterance's last run of frames
    layers: list[int] | None = None  # encoder layers, 1-based, as everywhere a user sees layers; None = all
    batch_seconds: float | None = None  # padded audio per batch; None: the device policy's default
    front_end: str = "auto"  # one of FRONT_ENDS for the waveform families; auto: the device policy's
    max_seconds: float | None = None
    checkpoint_seconds: float = 300.0
    checkpoint_utterances: int | None = None
    keep_checkpoint: bool = False  # keep the last checkpoint's state beside the complete store
    shard: tuple[int, int] = (0, 1)
    num_jobs: int | None = None  # data-loading workers; None: the device policy's default
    backend: str = "auto"
    stats_precision: str = "fp32"  # fp32: statistics of the fp32-accumulated activations in bf16/fp16 runs
    label_stats_design: str = "auto"  # split, one-read, or auto: the faster on a GPU (timed at the start), else split
    top_frames: int = 16  # N of the top_frames statistic (when collected)
    labels: tuple[str, ...] | None = None  # label parts of the joint label; None = every part of the corpus
    command: str = ""  # the command line that asked for the run (the CLI's, shell-quoted), recorded in the store

    def check(self) -> None:
        """Refuses settings that are wrong whatever the model and corpus, so that a run stops before loading
        either (the checks that need them are in :meth:`RunSpec.resolve`)."""
        if self.tokens not in MODES:
            raise ValueError(f"unknown token mode {self.tokens!r}; choose one of {MODES}")
        if not 0 < self.topk_ratio <= 1:
            raise ValueError(f"--topk-ratio must be in (0, 1] (k = round(λ·D) neurons of D), got {self.topk_ratio}")
        if not self.top_frames >= 1:
            raise ValueError(f"--top-frames must be at least 1, got {self.top_frames}")
        for name, value in (("--batch-seconds", self.batch_seconds), ("--max-seconds", self.max_seconds)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.num_jobs is not None and self.num_jobs < 0:
            raise ValueError(f"-j must be 0 (load in the main process) or more workers, got {self.num_jobs}")
        if self.front_end not in ("auto", *FRONT_ENDS):
            raise ValueError(f"unknown --front-end {self.front_end!r}; choose auto or one of {FRONT_ENDS}")
        if self.stats_precision not in PRECISIONS:
            raise ValueError(f"unknown --stats-precision {self.stats_precision!r}; choose from {PRECISIONS}")
        statistics(self.stats)
        if self.label_stats_design != "auto":
            from ..kernels.label_stats import DESIGNS

            if self.label_stats_design not in DESIGNS:
                raise ValueError(
                    f"unknown label_stats design {self.label_stats_design!r}; choose auto or one of {DESIGNS}"
                )

    def resolve_policy(
        self, family: Family, device: str | torch.device, dtype: str | torch.dtype, source: str
    ) -> DevicePolicy:
        """The device policy of this configuration for a model of ``family`` (from ``source``) on ``device`` in
        ``dtype`` (``auto``: the device's defaults)."""
        return DevicePolicy.resolve(
            family, device, dtype, self.front_end, self.backend, self.batch_seconds, self.num_jobs, source
        )

    def policy(self, adapter: ModelAdapter) -> DevicePolicy:
        """The device policy of a run on an adapter already loaded (its device and dtype)."""
        return self.resolve_policy(adapter.family, adapter.device, adapter.dtype, adapter.source)


@dataclass(frozen=True)
class RunSpec:
    """Everything a run needs decided before it starts; ``entries`` are the layer axis's (0-based), the
    store's ``layer`` coordinate numbers them from 1."""

    stats: tuple[Statistic, ...]
    topk_ratio: float
    k: int
    top_frames: int
    tokens: str
    drop_final_run: bool
    precision: str
    max_seconds: float | None
    checkpoint_seconds: float
    checkpoint_utterances: int | None
    keep_checkpoint: bool
    shard: tuple[int, int]
    entries: tuple[int, ...]
    width: int
    space: LabelSpace
    policy: DevicePolicy
    backend: Backend = field(repr=False)  # built once for these statistics, k and precision
    model: dict = field(repr=False)  # the model's record (its description when the run resolved)
    names: tuple[str, ...] = ()  # each collected entry's name (``3``, ``3.ffn1``)
    kept: tuple[tuple[int, ...], ...] | None = None  # a pruned model's neurons per entry: their original indices
    batching: dict = field(default_factory=dict)  # what the forward does to a padded batch
    command: str = ""
    indices: tuple[int, ...] = field(default=(), repr=False)  # the corpus's utterances this run (or shard) counts
    label_stats: DesignChoice | None = None  # the label_stats design of a Triton backend, and why

    @property
    def stat_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stats)

    @classmethod
    def resolve(
        cls,
        config: CollectConfig,
        adapter: ModelAdapter,
        corpus: PreparedCorpus,
        policy: DevicePolicy | None = None,
        distributed: bool = False,
    ) -> RunSpec:
        """Validates ``config`` against the model and the corpus; every refusal is one clear error.
        ``policy``: the device policy the model was loaded under (default: resolved from the adapter)."""
        adapter.check_geometry(corpus.geometry)
        config.check()
        policy = policy or config.policy(adapter)
        stats = statistics(config.stats)
        entries = adapter.layer_entries(config.layers)
        width = adapter.width_of(entries)
        k = max(1, round(config.topk_ratio * width))
        params = Params(k, config.top_frames) if any(s.axis == "top" for s in stats) else Params(k)
        try:
            backend = make_backend(policy.backend, stats, params, adapter.activation_name, config.stats_precision)
        except ValueError as e:
            raise ModelError(f"{adapter.source}: {e}") from None
        label_stats = choose_design(config.label_stats_design, backend, policy.device, policy.dtype, width)
        if label_stats is not None and label_stats.design != backend.design:  # the backend calls the chosen one
            backend = make_backend(
                policy.backend, stats, params, adapter.activation_name, config.stats_precision, label_stats.design
            )
        space = LabelSpace.of_corpus(corpus, config.labels)
        corpus.verify(space.parts)
        if config.max_seconds is not None and adapter.geometry.window:
            raise OptionError(
                f"--max-seconds: {adapter.source} cuts every utterance into its own windows of "
                f"{adapter.geometry.window / adapter.geometry.sample_rate:g} s; leave --max-seconds out"
            )
        shard_i, shard_n = config.shard
        if distributed and shard_n > 1:
            raise OptionError("--shard splits the corpus by hand; a torchrun job splits it over its ranks: use one")
        kept = None if adapter.kept is None else tuple(tuple(adapter.kept[i]) for i in entries)
        adapter.hash_weights()  # the fingerprint's weights from their content, never from the cache
        spec = cls(
            stats=stats,
            topk_ratio=config.topk_ratio,
            k=k,
            top_frames=params.top_frames,
            tokens=config.tokens,
            drop_final_run=config.drop_final_run,
            precision=config.stats_precision,
            max_seconds=config.max_seconds,
            checkpoint_seconds=config.checkpoint_seconds,
            checkpoint_utterances=config.checkpoint_utterances,
            keep_checkpoint=config.keep_checkpoint,
            shard=config.shard,
            entries=tuple(entries),
            width=width,
            space=space,
            policy=policy,
            backend=backend,
            model=adapter.describe(),
            names=tuple(adapter.ffns[i].name for i in entries),
            kept=kept,
            batching=adapter.batching(policy.front_end),
            command=config.command,
            indices=tuple(i for i in range(len(corpus)) if i % shard_n == shard_i),
            label_stats=label_stats,
        )
        spec.check_state_size()
        return spec

    def check_state_size(self) -> None:
        """Refuses a joint label space whose dense totals would not fit in the device's free memory."""
        device = self.policy.device
        need = len(self.entries) * self.width * sum(self.bytes_per_neuron(s) for s in self.stats)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > 0.7 * free:
            shape = " × ".join(f"{len(self.space.vocab(p))} {p}" for p in self.space.parts)
            raise ValueError(
                f"the joint label space ({shape} = {self.space.size} labels) needs {need / 2**30:.1f} GiB of state "
                f"for {len(self.entries)} layers × {self.width} neurons, more than the {free / 2**30:.1f} GiB free on "
                f"{device}; choose fewer label parts with --labels, fewer --layers or fewer --stat"
            )

    def bytes_per_neuron(self, stat: Statistic) -> int:
        """Bytes of one neuron's totals of ``stat`` in one layer (rows: the labels, or the N top frames)."""
        rows = self.top_frames if stat.axis == "top" else self.space.size
        return rows * sum(np.dtype(s.dtype).itemsize for s in stat.declaration.states)

    @property
    def _top_frames(self) -> int | None:
        return self.top_frames if "top_frames" in self.stat_names else None

    @property
    def dims(self) -> dict[str, tuple[str, ...]]:
        """The store dimensions of every variable this run writes."""
        return store_dims(self.stat_names)

    def _fingerprint(self, corpus: PreparedCorpus, where: dict) -> dict:
        """What a resume or a merge must match: every setting and input that changes a count."""
        model = self.model
        return {
            "model": model["model"],
            "revision": model["revision"],
            "weights": model["weights_sha1"],
            "dtype": str(self.policy.dtype).replace("torch.", ""),
            "stats_precision": self.precision,
            "stats": list(self.stat_names),
            "top_frames": self._top_frames,
            "topk_ratio": self.topk_ratio,
            "k": self.k,
            "tokens": self.tokens,
            "drop_final_run": self.drop_final_run,
            "layers": [i + 1 for i in self.entries],
            "labels": self.space.to_dict(),
            "label_sets": {n: corpus.label_sets[n]["file"] for n in self.space.parts if n in corpus.label_sets},
            "pitch_edges": corpus.edges,
            "pitch_rule": corpus.meta.pitch.rule,
            "frame_labels": corpus.meta.frame_labels,
            "corpus_content": corpus.content_digests(self.space.parts),
            "corpus": where,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "max_seconds": self.max_seconds,
        }

    def store_coords(self, corpus: PreparedCorpus) -> dict[str, np.ndarray]:
        """The store's coordinates: the layer axis's entries (1-based) and their names (``ffn``: ``3``, or
        ``3.ffn1`` and ``3.ffn2`` for a Conformer), the label parts of each joint label, a pruned model's
        neurons' indices in the model it was pruned from (``original_neuron``) and, with the top frames, the
        corpus's utterance ids (``top_utterance`` indexes them)."""
        coords = {
            "layer": np.asarray([i + 1 for i in self.entries], dtype=np.int64),
            "ffn": np.asarray(self.names, dtype=str),
            **self.space.names(),
        }
        if self.kept is not None:
            coords["original_neuron"] = np.asarray(self.kept, dtype=np.int64)
        if "top_frames" in self.stat_names:
            coords["utterance"] = np.asarray([r["id"] for r in corpus.records], dtype=str)
        return coords

    def store_meta(self, corpus: PreparedCorpus) -> StoreMeta:
        """The store's metadata for this run, from the spec alone (the fingerprint is what a resume must match)."""
        where = {"root": corpus.meta.root, "subset": corpus.meta.subset, "prepared": str(corpus.path.resolve())}
        dtype = self.policy.dtype
        return StoreMeta(
            fingerprint=self._fingerprint(corpus, where),
            model=self.model,
            statistics={
                "stats": list(self.stat_names),
                "topk_ratio": self.topk_ratio,
                "k": self.k,
                "top_frames": self._top_frames,
                "tokens": self.tokens,
                "drop_final_run": self.drop_final_run,
                "ties": "lower neuron index wins at the k-th |a|",
                "var_ddof": 0,
                "moments": f"per-batch {_sums_dtype(dtype, self.policy.backend)} sums around a per-neuron shift, "
                "merged in float64 (Chan et al.)",
                "merge": {var: s.rule.name for s in self.stats for var in s.store},
                "backend": self.policy.backend,
                "label_stats": self.label_stats.to_dict() if self.label_stats else None,
                "precision": _describe_precision(self.precision, dtype, self.policy.backend),
            },
            labels=self.space.to_dict(),
            label_sets={
                name: {k: v for k, v in entry.items() if k != "vocab"}
                for name, entry in corpus.label_sets.items()
                if name in self.space.parts
            },
            pitch=corpus.meta.pitch.to_dict(),
            frame_labels=corpus.meta.frame_labels,
            phone_map=corpus.meta.phone_map,
            corpus={
                **where,
                "utterances": len(self.indices),
                "shard": f"{self.shard[0]}/{self.shard[1]}",
                "prepare_skips": corpus.skips,
                **({"lacking": corpus.meta.lacking} if corpus.meta.lacking else {}),
            },  # fmt: skip
            batching={**self.batching, "max_seconds": self.max_seconds, **self.policy.record()},
            versions=_versions(),
            command=self.command,
        )


_HALF = (torch.float16, torch.bfloat16)


def _sums_dtype(dtype: torch.dtype, backend: str) -> str:
    """The dtype of the per-batch moment sums: the statistics' activations promoted to at least fp32 by the
    torch backend (float64 in a float64 run); the Triton kernels sum in fp32."""
    return "float64" if dtype == torch.float64 and backend == "torch" else "fp32"


def _describe_precision(precision: str, dtype: torch.dtype, backend: str = "torch") -> str:
    """The store's ``statistics.precision``: which activations the statistics saw, and by which route the
    model's forward went on (its first word is the setting)."""
    model = str(dtype).replace("torch.", "")
    if dtype not in _HALF:
        return f"{precision}: the model's own {model} activations (the setting matters in float16/bfloat16 runs)"
    if precision == "model":
        return f"model: the {model} activations the model computes (ties at the k-th |a| are frequent)"
    if backend == "triton-fused":
        return (
            f"fp32: the fused kernel's fp32 act(x W1ᵀ + b1); the model went on from its {model} rounding "
            f"(a GEMM of its own, not cuBLAS's)"
        )
    return (
        f"fp32: the FFN's first GEMM ran once with an fp32 output and the bias added in fp32; the statistics "
        f"saw its activation in fp32, the model went on from its {model} rounding: {ROUTE_BOUND}"
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
