"""Backends: what computes one layer's per-label batch partials and folds them into the totals.

- ``torch``: each statistic's torch function from the table (the reference path); on CUDA nothing
  syncs with the host.
- ``triton``: the model's own GEMM and activation, then the ``label_stats`` kernels for the statistics
  they cover (top-k, positive, moments) and the ``fold_sums`` kernel that folds them in (one launch per
  layer and batch); any other statistic takes its torch function.  The activations are bit-identical
  to the torch path, so the counts are identical.  ``label_stats`` has two designs (``split``,
  ``one-read``) that compute the same sums: :func:`choose_design` picks one per run.
- ``triton-fused``: the ``ffn_up_stats`` kernel computes the FFN's first GEMM and activation itself,
  with positive counts and moment sums in its epilogue; the rest as ``triton``.

Statistics precision (``precision``): ``model`` takes the statistics on the activations the model
computes in its own dtype; ``fp32`` — the default — on ``act(x W1ᵀ + b1)`` accumulated in fp32, which
differs only in a bf16/fp16 run.  There bf16 keeps 8 bits of mantissa, so ~18 % of token rows tie at the
k-th |a| and the lower-index rule, not the activation, decides them: a top-k statistic skewed towards
low neuron indices.  The ``torch`` and ``triton`` backends run the model's first GEMM once with an fp32
output (:func:`fp32_preactivation`): the statistics take the activation of it in fp32, and the model
continues from its rounding to the model's dtype — within one half-precision ulp of the stock
pre-activation plus the two GEMMs' fp32 accumulation error (:data:`ROUTE_BOUND`), so no second GEMM.
``triton-fused`` writes its output in fp32 (statistics in its epilogue and the top-k from it) and rounds
it to the model's dtype for W2.

A backend is chosen once (:func:`make_backend`), from a name and the device.
"""

from __future__ import annotations

import functools
import os
import statistics
from dataclasses import dataclass

import torch

from ..choices import BACKENDS, PRECISIONS
from .batching import CHUNK_ROWS, TokenBatch, chunk_tokens
from .statistics import Params, Statistic

_HALF = (torch.float16, torch.bfloat16)


ROUTE_BOUND = (
    "|h - h_stock| <= ulp(max(|h|, |h_stock|)) + 2 (K + 1) 2^-24 (sum_i |x_i w_i| + |b|) per pre-activation "
    "(K inputs, ulp of the model's dtype)"
)
"""How far the pre-activation ``h`` the model continues from under fp32 statistics may be from the stock
forward's ``h_stock``: both are one rounding of an fp32 sum of the same exact products and the bias (each
sum within (K + 1)·2⁻²⁴·(Σ|x_i w_i| + |b|) of the true value, whatever its order), and rounding to
nearest keeps two values within δ of each other within one ulp + δ.  It assumes what cuBLAS and the CPU
GEMMs do for half inputs: fp32 accumulation and one rounding.  Everything after the FFN's first GEMM is
the model's own code."""


def fp32_preactivation(up: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W1ᵀ + b1`` [N, D] of rows ``x`` [N, H] as one GEMM with an fp32 output: the products of two
    bf16/fp16 values are exact in fp32, the sums and the bias are fp32 (on CUDA the half-precision tensor
    cores with an fp32 output, as the model's own GEMM before it rounds)."""
    if x.is_cuda and x.dtype in _HALF:
        h = torch.mm(x, up.weight.t(), out_dtype=torch.float32)
    else:
        h = x.float() @ up.weight.float().t()
    if up.bias is not None:
        h += up.bias.float()
    return h


def fp32_activations(ffn, x: torch.Tensor) -> torch.Tensor:
    """``act(x W1ᵀ + b1)`` [N, D] of rows ``x`` [N, H], accumulated and kept in fp32."""
    return ffn.act(fp32_preactivation(ffn.up, x))


class Backend:
    """The torch backend; the Triton backends override parts of it."""

    name = "torch"
    fused = False
    """Whether the backend computes the FFN's first GEMM itself (:meth:`TritonFusedBackend.ffn_partials`)."""
    design: str | None = None
    """The ``label_stats`` design the backend calls (None: it calls none)."""

    def __init__(self, stats: tuple[Statistic, ...], params: Params, activation: str = "gelu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown statistics precision {precision!r}; choose from {PRECISIONS}")
        self.stats, self.params, self.activation, self.precision = stats, params, activation, precision
        self.k = params.k

    def fp32_stats(self, dtype: torch.dtype) -> bool:
        """Whether the statistics need activations more precise than the model's ``dtype`` gives."""
        return self.precision == "fp32" and dtype in _HALF

    def ffn_forward(self, ffn, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's ``act(W1 x + b1)`` [.., D] and, for fp32 statistics of a half-precision run, the
        fp32 pre-activation [B*T, D] of the same single GEMM, whose rounding the activation took."""
        if not self.fp32_stats(hidden.dtype):
            return ffn.act(ffn.up(hidden)), None
        pre = fp32_preactivation(ffn.up, hidden.reshape(-1, hidden.shape[-1]))
        a = ffn.act(pre.to(hidden.dtype))
        return a.view(*hidden.shape[:-1], a.shape[-1]), pre

    def stats_rows(
        self, ffn, a: torch.Tensor, pre: torch.Tensor | None, batch: TokenBatch
    ) -> tuple[torch.Tensor, TokenBatch]:
        """The rows the statistics read and the batch that indexes them: the model's activations [B*T, D],
        or the fp32 activation of ``pre`` — of every row when most rows are tokens (no gather), else of
        the token rows only."""
        if pre is None:
            return a.reshape(-1, a.shape[-1]), batch
        if 2 * batch.num_tokens > pre.shape[0]:
            return ffn.act(pre), batch
        return ffn.act(pre.index_select(0, batch.index)), batch.token_rows()

    def partials(self, a: torch.Tensor, batch: TokenBatch, shift: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Per-label partials ([U, D]; [N, D] for a ``top`` statistic) of the token rows ``a[batch.index]`` of one layer's activations [B*T, D]."""
        return self._torch_partials(self.stats, a, batch, shift)

    def label_stats_kinds(self) -> set[str]:
        """The statistics (of ``topk``, ``positive``, ``moments``) the backend asks ``label_stats`` for."""
        return set()

    def _torch_partials(self, stats, a, batch, shift) -> dict[str, torch.Tensor]:
        out = {}
        if stats:
            x = a.index_select(0, batch.index)
            for s in stats:
                out.update(s.torch_partials(x, batch, self.params, shift))
        return out

    def fold(self, partials, batch: TokenBatch, tokens, shift, totals: dict[str, dict[str, torch.Tensor]]) -> None:
        """Folds one batch's partials into one layer's totals [num_labels, D], each statistic's its own
        (``tokens``: before the batch)."""
        self._torch_fold(self.stats, partials, batch, tokens, shift, totals)

    @staticmethod
    def _torch_fold(stats, partials, batch, tokens, shift, totals) -> None:
        for s in stats:
            s.rule.fold(s, totals[s.name], partials, batch.labels, batch.counts, tokens, shift)


class TritonBackend(Backend):
    name = "triton"

    def __init__(
        self,
        stats: tuple[Statistic, ...],
        params: Params,
        activation: str = "gelu",
        precision: str = "fp32",
        design: str | None = None,
    ):
        """``design``: the ``label_stats`` design (one of its ``DESIGNS``; None: its ``DEFAULT_DESIGN``)."""
        from ..kernels.label_stats import DEFAULT_DESIGN, DESIGNS

        super().__init__(stats, params, activation, precision)
        if design is not None and design not in DESIGNS:
            raise ValueError(f"unknown label_stats design {design!r}; choose from {DESIGNS}")
        self.design = design or DEFAULT_DESIGN
        self.kernel = tuple(s for s in stats if "label_stats" in s.kernels)  # folded by fold_sums too
        self.others = tuple(s for s in stats if "label_stats" not in s.kernels)

    def label_stats_kinds(self) -> set[str]:
        return {s.name for s in self.kernel}

    def _kernel_sums(self, a, batch, shift, which: set[str]) -> dict[str, torch.Tensor]:
        from ..kernels.label_stats import label_stats

        if not which:
            return {}
        return label_stats(
            a,
            batch.sorted_rows,
            batch.sorted_local,
            batch.chunk_starts,
            batch.chunk_labels,
            batch.labels.numel(),
            self.k,
            shift,
            topk="topk" in which,
            positive="positive" in which,
            moments="moments" in which,
            design=self.design,
        )

    def partials(self, a, batch, shift) -> dict[str, torch.Tensor]:
        out = self._kernel_sums(a, batch, shift, {s.name for s in self.kernel})
        out.update(self._torch_partials(self.others, a, batch, shift))
        return out

    def fold(self, partials, batch, tokens, shift, totals) -> None:
        from ..kernels.fold_sums import fold_sums

        if self.kernel:
            mine = {n: partials[n] for s in self.kernel for n in s.partials}
            own = {n: totals[s.name][n] for s in self.kernel for n in s.states}
            fold_sums(mine, batch.labels, batch.counts, tokens, shift, own)
        self._torch_fold(self.others, partials, batch, tokens, shift, totals)


class TritonFusedBackend(TritonBackend):
    name = "triton-fused"
    fused = True

    def label_stats_kinds(self) -> set[str]:
        return super().label_stats_kinds() & {"topk"}  # the GEMM's epilogue sums the others

    def token_activations(self, ffn, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """The token rows [N, D] of the FFN's activation at the statistics' precision (the first batch's
        moment shift: the fused kernel needs it before it runs)."""
        x = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.index)
        return fp32_activations(ffn, x) if self.fp32_stats(x.dtype) else ffn.act(ffn.up(x))

    def ffn_partials(self, ffn, hidden, batch, shift):
        """``act(W1 x + b1)`` [.., D] from the fused kernel (rounded to the model's dtype) and its partials."""
        from ..kernels.ffn_up_stats import ffn_up_stats

        shape = hidden.shape
        epilogue = {n for s in self.kernel if "ffn_up_stats" in s.kernels for n in s.partials}
        y, partials = ffn_up_stats(
            hidden.reshape(-1, shape[-1]),
            ffn.up.weight,
            ffn.up.bias,
            self.activation,
            batch.perm,
            batch.sorted_local,
            batch.labels.numel(),
            shift,
            stats=bool(epilogue),
            out_dtype=torch.float32 if self.fp32_stats(hidden.dtype) else hidden.dtype,
        )
        partials = {n: t for n, t in partials.items() if n in epilogue}
        partials.update(self._kernel_sums(y, batch, shift, self.label_stats_kinds()))
        partials.update(self._torch_partials(self.others, y, batch, shift))
        return y.to(hidden.dtype).view(*shape[:-1], y.shape[-1]), partials


_CLASSES = {cls.name: cls for cls in (Backend, TritonBackend, TritonFusedBackend)}


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``auto`` → Triton on CUDA, torch elsewhere; Triton off CUDA only under ``TRITON_INTERPRET=1``."""
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose auto or one of {BACKENDS}")
    if name != "torch" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--backend {name} needs a CUDA device (or TRITON_INTERPRET=1, the slow CPU interpreter)")
    return name


def make_backend(
    name: str,
    stats: tuple[Statistic, ...],
    params: Params,
    activation: str = "gelu",
    precision: str = "fp32",
    design: str | None = None,
) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`) for these statistics at ``precision``; a
    Triton backend calls the ``label_stats`` ``design`` (None: the kernels' default; the torch backend
    calls none and ignores it)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
    if name == "triton-fused":
        from ..kernels.ffn_up_stats import ACTIVATIONS

        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} has no fused kernel; use --backend triton")
    if name == "torch":
        return Backend(stats, params, activation, precision)
    return _CLASSES[name](stats, params, activation, precision, design)


@dataclass(frozen=True)
class DesignChoice:
    """Which ``label_stats`` design a run calls and why: the store records it (``statistics.label_stats``)."""

    design: str
    reason: str
    microseconds: dict[str, float] | None = None  # each design's median time on the timing rows

    def to_dict(self) -> dict:
        out = {"design": self.design, "chosen": self.reason}
        if self.microseconds:
            out["microseconds"] = dict(self.microseconds)
        return out


TIMING_ROWS, TIMING_LABELS = 8192, 256
"""The synthetic work :func:`choose_design` times: token rows (about one 160 s batch of all frames) sorted
into this many labels."""


def choose_design(
    asked: str, backend: Backend, device: torch.device | str, dtype: torch.dtype, width: int
) -> DesignChoice | None:
    """The ``label_stats`` design of a run (None: ``backend`` calls no ``label_stats``).

    ``asked`` names a design, or ``auto``: on CUDA both designs are timed once, at the start of the run,
    on :data:`TIMING_ROWS` random token rows of the run's width, k, statistics and row dtype (the
    statistics' precision decides it), and the faster is taken; without a GPU (the interpreter, whose
    timings say nothing about a card) the kernels' ``DEFAULT_DESIGN``.  Both designs give the same
    counts; the moment sums differ only in the order of their fp32 additions."""
    from ..kernels.label_stats import DEFAULT_DESIGN, DESIGNS

    if asked != "auto" and asked not in DESIGNS:
        raise ValueError(f"unknown label_stats design {asked!r}; choose auto or one of {DESIGNS}")
    kinds = backend.label_stats_kinds()
    if not kinds:
        return None
    if asked != "auto":
        return DesignChoice(asked, "asked for")
    if torch.device(device).type != "cuda":
        return DesignChoice(DEFAULT_DESIGN, "the default without a GPU (nothing to time)")
    rows_dtype = torch.float32 if backend.fp32_stats(dtype) else dtype
    times, failed = time_designs(device, rows_dtype, width, backend.k, kinds)
    best = min(times, key=times.get)
    name = str(rows_dtype).removeprefix("torch.")
    reason = (
        f"the faster on {torch.cuda.get_device_name(device)}, timed at the start on {TIMING_ROWS} × {width} "
        f"{name} rows"
    )
    for design, error in failed.items():
        reason += f"; {design} failed there ({error})"
    return DesignChoice(best, reason, times)


def time_designs(
    device: torch.device | str, dtype: torch.dtype, width: int, k: int, kinds: set[str], repeat: int = 5
) -> tuple[dict[str, float], dict[str, str]]:
    """Median microseconds of each ``label_stats`` design (after two calls that compile and warm it) on
    :data:`TIMING_ROWS` random GELU rows in :data:`TIMING_LABELS` labels, on a CUDA ``device``; and the
    error of each design other than the default that failed to compile or run there (a new design must
    not stop a run that the default would carry)."""
    from ..kernels.label_stats import DEFAULT_DESIGN, DESIGNS, label_stats

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, TIMING_LABELS, (TIMING_ROWS,), generator=g)
    work = [t.to(device) for t in chunk_tokens(torch.arange(TIMING_ROWS), labels, CHUNK_ROWS)]
    y = torch.nn.functional.gelu(torch.randn(TIMING_ROWS, width, generator=g)).to(device, dtype)
    shift = torch.zeros(width, device=device)
    which = {"topk": "topk" in kinds, "positive": "positive" in kinds, "moments": "moments" in kinds}
    times, failed = {}, {}
    with torch.cuda.device(device):
        for design in sorted(DESIGNS, key=lambda d: d != DEFAULT_DESIGN):
            call = functools.partial(label_stats, y, *work, TIMING_LABELS, k, shift, **which, design=design)
            try:
                times[design] = _median_microseconds(call, repeat)
            except Exception as e:  # Triton's compile and resource errors have no common type
                if design == DEFAULT_DESIGN:
                    raise
                failed[design] = f"{type(e).__name__}: {str(e)[:200]}"
    return times, failed


def _median_microseconds(call, repeat: int) -> float:
    """Median CUDA-event time of ``call()`` over ``repeat`` calls, after two that compile and warm it."""
    call(), call()
    runs = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        runs.append(start.elapsed_time(end) * 1e3)
    return round(statistics.median(runs), 1)
