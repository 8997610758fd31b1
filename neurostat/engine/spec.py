"""A collect run's settings (:class:`CollectConfig`, what the caller asks for) and its :class:`RunSpec`:
the config resolved once against the model, the corpus and the device — validated in one place, with
the device's defaults filled in, never written back into the caller's config.  The store's metadata
and its fingerprint are projections of the spec (:meth:`RunSpec.store_meta`)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import numpy as np
import torch

from ..choices import FRONT_ENDS
from ..corpus.prepared import PreparedCorpus
from ..declarations import DEFAULT_STATS
from ..errors import OptionError
from ..labelspace import LabelSpace
from ..model.adapter import ModelAdapter, ModelError
from ..store import StoreMeta
from ..version import __version__
from .backends import PRECISIONS, ROUTE_BOUND, DesignChoice, choose_design, make_backend, resolve_backend
from .batching import default_batch_seconds, default_num_jobs
from .statistics import TABLE, Params, statistics
from .tokens import MODES


@dataclass
class CollectConfig:
    stats: tuple[str, ...] = DEFAULT_STATS
    topk_ratio: float = 0.01
    tokens: str = "phone-mid"
    drop_final_run: bool = False  # the paper's code never counts an utterance's last run of frames
    layers: list[int] | None = None  # 1-based, as everywhere a user sees layers; None = all
    batch_seconds: float | None = None  # padded audio per batch; None: default_batch_seconds(device)
    front_end: str = "auto"  # one of FRONT_ENDS; auto: default_front_end(device)
    max_seconds: float | None = None
    checkpoint_seconds: float = 300.0
    checkpoint_utterances: int | None = None
    keep_checkpoint: bool = False  # keep the last checkpoint's state beside the complete store
    shard: tuple[int, int] = (0, 1)
    num_jobs: int | None = None  # data-loading workers; None: default_num_jobs(device)
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
        if self.label_stats_design != "auto":
            from ..kernels.label_stats import DESIGNS

            if self.label_stats_design not in DESIGNS:
                raise ValueError(
                    f"unknown label_stats design {self.label_stats_design!r}; choose auto or one of {DESIGNS}"
                )


@dataclass(frozen=True)
class RunSpec:
    """Everything a run needs decided before it starts (``layers`` are 0-based here)."""

    config: CollectConfig
    stats: tuple[str, ...]
    batch_seconds: float
    front_end: str
    backend: str
    num_jobs: int
    layers: tuple[int, ...]
    width: int
    k: int
    space: LabelSpace
    indices: tuple[int, ...] = field(repr=False)  # the corpus's utterances this run (or shard) counts
    label_stats: DesignChoice | None = None  # the label_stats design of a Triton backend, and why

    @classmethod
    def resolve(
        cls, config: CollectConfig, adapter: ModelAdapter, corpus: PreparedCorpus, distributed: bool = False
    ) -> RunSpec:
        """Validates ``config`` against the model and the corpus; every refusal is one clear error."""
        adapter.check_geometry(corpus.geometry)
        config.check()
        front_end = adapter.resolve_front_end(config.front_end)
        stats = tuple(s.name for s in statistics(config.stats))
        backend = resolve_backend(config.backend, adapter.device)
        width = adapter.width
        k = max(1, round(config.topk_ratio * width))
        try:
            probe = make_backend(backend, statistics(stats), Params(k), adapter.activation_name, config.stats_precision)
        except ValueError as e:
            raise ModelError(f"{adapter.source}: {e}") from None
        layers = range(adapter.num_layers) if config.layers is None else sorted({i - 1 for i in config.layers})
        bad = [i + 1 for i in layers if not 0 <= i < adapter.num_layers]
        if bad:
            raise ModelError(f"{adapter.source} has layers 1..{adapter.num_layers}; no layer {bad}")
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
        spec = cls(
            config=config,
            stats=stats,
            batch_seconds=config.batch_seconds or default_batch_seconds(adapter.device),
            front_end=front_end,
            backend=backend,
            num_jobs=default_num_jobs(adapter.device) if config.num_jobs is None else config.num_jobs,
            layers=tuple(layers),
            width=width,
            k=k,
            space=space,
            indices=tuple(i for i in range(len(corpus)) if i % shard_n == shard_i),
            label_stats=choose_design(config.label_stats_design, probe, adapter.device, adapter.dtype, width),
        )
        spec.check_state_size(adapter.device)
        return spec

    def check_state_size(self, device: torch.device) -> None:
        """Refuses a joint label space whose dense totals would not fit in the device's free memory."""
        need = len(self.layers) * self.width * sum(_bytes_per_neuron(TABLE[s], self) for s in self.stats)
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > 0.7 * free:
            shape = " × ".join(f"{len(self.space.vocab(p))} {p}" for p in self.space.parts)
            raise ValueError(
                f"the joint label space ({shape} = {self.space.size} labels) needs {need / 2**30:.1f} GiB of state "
                f"for {len(self.layers)} layers × {self.width} neurons, more than the {free / 2**30:.1f} GiB free on "
                f"{device}; choose fewer label parts with --labels, fewer --layers or fewer --stat"
            )

    @property
    def _top_frames(self) -> int | None:
        return self.config.top_frames if "top_frames" in self.stats else None

    def _fingerprint(self, adapter: ModelAdapter, corpus: PreparedCorpus, where: dict) -> dict:
        """What a resume or a merge must match: every setting and input that changes a count."""
        config = self.config
        return {
            "model": adapter.source,
            "revision": adapter.revision,
            "weights": adapter.weights,
            "dtype": str(adapter.dtype).replace("torch.", ""),
            "stats_precision": config.stats_precision,
            "stats": list(self.stats),
            "top_frames": self._top_frames,
            "topk_ratio": config.topk_ratio,
            "k": self.k,
            "tokens": config.tokens,
            "drop_final_run": config.drop_final_run,
            "layers": [i + 1 for i in self.layers],
            "labels": self.space.to_dict(),
            "label_sets": {n: corpus.label_sets[n]["file"] for n in self.space.parts if n in corpus.label_sets},
            "pitch_edges": corpus.edges,
            "pitch_rule": corpus.meta.pitch.rule,
            "frame_labels": corpus.meta.frame_labels,
            "corpus_content": corpus.content_digests(self.space.parts),
            "corpus": where,
            "shard": f"{config.shard[0]}/{config.shard[1]}",
            "max_seconds": config.max_seconds,
        }

    def store_coords(self, corpus: PreparedCorpus) -> dict[str, np.ndarray]:
        """The store's coordinates: layers (1-based), the label parts of each joint label and, with the top
        frames, the corpus's utterance ids (``top_utterance`` indexes them)."""
        coords = {"layer": np.asarray([i + 1 for i in self.layers], dtype=np.int64), **self.space.names()}
        if "top_frames" in self.stats:
            coords["utterance"] = np.asarray([r["id"] for r in corpus.records], dtype=str)
        return coords

    def store_meta(self, adapter: ModelAdapter, corpus: PreparedCorpus) -> StoreMeta:
        """The store's metadata for this run (the fingerprint is what a resume must match)."""
        config, shard = self.config, f"{self.config.shard[0]}/{self.config.shard[1]}"
        where = {"root": corpus.meta.root, "subset": corpus.meta.subset, "prepared": str(corpus.path.resolve())}
        return StoreMeta(
            fingerprint=self._fingerprint(adapter, corpus, where),
            model=adapter.describe(),
            statistics={
                "stats": list(self.stats),
                "topk_ratio": config.topk_ratio,
                "k": self.k,
                "top_frames": self._top_frames,
                "tokens": config.tokens,
                "drop_final_run": config.drop_final_run,
                "ties": "lower neuron index wins at the k-th |a|",
                "var_ddof": 0,
                "moments": "per-batch fp32 sums around a per-neuron shift, merged in float64 (Chan et al.)",
                "merge": {var: TABLE[name].rule.name for name in self.stats for var in TABLE[name].store},
                "backend": self.backend,
                "label_stats": self.label_stats.to_dict() if self.label_stats else None,
                "precision": _describe_precision(config.stats_precision, adapter.dtype, self.backend),
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
                "shard": shard,
                "prepare_skips": corpus.skips,
                **({"lacking": corpus.meta.lacking} if corpus.meta.lacking else {}),
            },
            batching={
                "front_end": self.front_end,
                "group_norm": "statistics per utterance over its valid positions",
                "transformer": f"batched with a boolean frame mask, {adapter.attention} attention",
                "max_seconds": config.max_seconds,
                "batch_seconds": self.batch_seconds,
                "loader_workers": self.num_jobs,
            },
            versions=_versions(),
            command=config.command,
        )


def _bytes_per_neuron(stat, spec: RunSpec) -> int:
    """Bytes of one neuron's totals of ``stat`` in one layer (rows: the labels, or the N top frames)."""
    rows = spec.config.top_frames if stat.axis == "top" else spec.space.size
    return rows * sum(np.dtype(s.dtype).itemsize for s in stat.declaration.states)


def _describe_precision(precision: str, dtype: torch.dtype, backend: str = "torch") -> str:
    """The store's ``statistics.precision``: which activations the statistics saw, and by which route the
    model's forward went on (its first word is the setting)."""
    model = str(dtype).replace("torch.", "")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{precision}: the model's {model} activations"
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
