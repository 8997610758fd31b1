"""GPU benchmark of the statistics kernels and the engine's backends, one process, one card.

Kernel level (HuBERT-base FFN geometry, bf16): cuBLAS GEMM alone; cuBLAS GEMM + GELU (the model's
own path); one read of the token rows (the memory floor); `label_stats` over the token rows in both
designs — `split`: the top-k kernel's rows and warps and the sums kernel's columns, rows, warps and
atomics or two passes swept around the H200's best, then all statistics with the best tunings against
one read, per statistic and per chunk size; `one-read`: its rows per tile, tiles per program, radix
digit and warps swept with all statistics, the best against one read and per statistic —, both
designs on the fp32 rows of `--stats-precision fp32` (the engine's default input) and the design the
engine's own start-of-run timing picks; the torch statistics on the same rows; the fold of a
layer's batch sums into the totals (torch ops vs the `fold_sums` kernel); `ffn_up_stats` (GEMM + GELU +
positive/moment epilogue) in a few tile shapes, with bf16 and fp32 output; the fp32 route of
`--stats-precision fp32` (one GEMM with an fp32 output whose rounding feeds the model, and the fp32
GELU of the token rows).  Achieved TFLOP/s, GB/s and % of the card's HBM bandwidth.

Precision study: the FFN inputs x a bf16 HuBERT-base feeds its layers; the top-k memberships of the
bf16 activations and of the fp32-precision statistics against act(x W1ᵀ + b1) in float64, with the
mean neuron index of the memberships gained and lost; then whole runs (bf16 forward with each
precision against an fp32 forward of the same weights); and how far the fp32 route moves the model
(pre-activations against the stated bound, the last hidden state against the stock bf16 forward).

Engine level: batches of ~16 x 15 s of random audio through a random HuBERT-base in bf16, with
random phone-like labels (runs of 2-8 frames): the plain forward vs the torch backend vs `triton`
(defaults: fp32 precision, statistics on a side CUDA stream; the `split` design, and once with
`one-read`) vs `triton` with model precision and each without the side stream vs `triton-fused`
(`--compile` adds `torch.compile` of the torch
statistics); frames/s and ratios, what fp32 precision costs over model precision and what the side
stream saves, and a device profile of one `triton` pass.  Counts of every triton run are checked
against the torch backend's.

Each table is printed and appended the moment it is done, with the seconds since the start (sized
to finish in under 3 minutes on an H200 with the default --repeat 3).

    python bench/kernel_bench.py                    # on a CUDA machine; appends to bench/RESULTS.md
    TRITON_INTERPRET=1 python bench/kernel_bench.py --smoke   # tiny shapes on CPU, checks the script
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch
from benchutil import RESULTS, TIMING, emit, once, sync, timed

import neurostat.kernels.ffn_up_stats as fused
import neurostat.kernels.label_stats as label_stats_module
from neurostat.declarations import DEFAULT_STATS
from neurostat.engine.accumulate import Accumulator
from neurostat.engine.backends import (
    ROUTE_BOUND,
    Backend,
    choose_design,
    fp32_activations,
    fp32_preactivation,
    make_backend,
)
from neurostat.engine.batching import TokenBatch, chunk_tokens
from neurostat.engine.statistics import Params, topk_mask
from neurostat.engine.statistics import statistics as table_entries
from neurostat.kernels.ffn_up_stats import ffn_up_stats
from neurostat.kernels.fold_sums import fold_sums
from neurostat.kernels.label_stats import DESIGNS, label_stats
from neurostat.kernels.reference import topk_mask_reference
from neurostat.model.adapter import FFN
from neurostat.model.factory import build_model, feature_extractor
from neurostat.model.loading import adapter_for


def phone_labels(num_frames: int, mode: str, rng: np.random.Generator, num_phones=41, genders=2, bins=4) -> np.ndarray:
    """Random joint labels with phone runs of 2-8 frames; tokens by ``mode`` (−1 elsewhere)."""
    runs = rng.integers(2, 9, num_frames)
    phones = np.repeat(rng.integers(0, num_phones, len(runs)), runs)[:num_frames]
    gender = rng.integers(0, genders)
    joint = (phones * genders + gender) * bins + rng.integers(0, bins, num_frames)
    if mode == "all":
        return joint
    out = np.full(num_frames, -1)
    starts = np.flatnonzero(np.r_[True, phones[1:] != phones[:-1]])
    ends = np.r_[starts[1:], num_frames] - 1
    mids = (starts + ends) // 2
    out[mids] = joint[mids]
    return out


def make_batches(adapter, n_batches, per_batch, seconds, mode, rng):
    sr = adapter.geometry.sample_rate
    batches = []
    for _ in range(n_batches):
        waves = [
            torch.from_numpy(
                adapter.normalize(
                    (rng.standard_normal(int(sr * rng.uniform(0.85, 1.0) * seconds)) * 0.1).astype(np.float32)
                )
            )
            for _ in range(per_batch)
        ]
        frames = [adapter.geometry.num_frames(len(w)) for w in waves]
        flat = np.full((per_batch, max(frames)), -1)
        for b, n in enumerate(frames):
            flat[b, :n] = phone_labels(n, mode, rng)
        batches.append((waves, TokenBatch.from_labels(flat.reshape(-1)), sum(frames)))
    return batches


def torch_sums(x: torch.Tensor, local: torch.Tensor, num_labels: int, k: int, shift: torch.Tensor):
    """The torch statistics of token rows as one function (what torch.compile gets)."""
    z = torch.zeros((num_labels, x.shape[1]), dtype=torch.float32, device=x.device)
    dev = x.float() - shift
    return {
        "topk": z.index_add(0, local, topk_mask(x, k).float()),
        "positive": z.index_add(0, local, (x > 0).float()),
        "s1": z.index_add(0, local, dev),
        "s2": z.index_add(0, local, dev * dev),
    }


class CompiledTorchBackend(Backend):
    """The torch statistics as one ``torch.compile``d function (a design option the engine runs compare)."""

    name = "compile"

    def __init__(self, stats, params, activation="gelu"):
        super().__init__(stats, params, activation)
        self.compiled = torch.compile(torch_sums, dynamic=True)

    def partials(self, a, batch, shift):
        return self.compiled(a.index_select(0, batch.index), batch.local, batch.labels.numel(), self.k, shift)


HBM_GBS = {"H200": 4800, "H100 80GB HBM3": 3350, "H100": 3350, "A100": 2039, "L40S": 864, "L4": 300}
"""Peak memory bandwidth (GB/s) of the cards the bench has met, by the first matching part of the name."""


def hbm_peak(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((gbs for part, gbs in HBM_GBS.items() if part in name), None)


def sweep(run, tunings, device, tolerate: bool = False) -> tuple[list[tuple[dict, float | str]], dict]:
    """Times ``run()`` under each ``label_stats`` tuning; returns the times and the fastest tuning (left set).
    With ``tolerate`` a tuning that fails on this card gets its error instead of a time (a new design must
    not cost the other measurements); the fastest is {} when every tuning failed."""
    times = []
    for tuning in tunings:
        label_stats_module.TUNING.update(tuning)
        try:
            times.append((tuning, timed(run, device)))
        except Exception as e:
            if not tolerate:
                raise
            times.append((tuning, f"failed: {type(e).__name__}: {str(e)[:120]}"))
    ran = [item for item in times if not isinstance(item[1], str)]
    best = dict(min(ran, key=lambda item: item[1])[0]) if ran else {}
    label_stats_module.TUNING.update(best)
    return times, best


def ffn_of(weight: torch.Tensor, bias: torch.Tensor) -> FFN:
    """An FFN whose first linear layer has these weights (what :func:`fp32_activations` takes)."""
    up = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        up.weight.copy_(weight)
        up.bias.copy_(bias)
    return FFN(None, up, torch.nn.functional.gelu, None)


def fold_check(sums, batch, num_labels, D, shift, device) -> tuple[float, float, bool]:
    """Seconds of merging one layer's batch sums into [num_labels, D] totals with torch ops and with the
    ``fold_sums`` kernel, and whether the two give the same totals."""
    tokens = torch.randint(0, 100, (num_labels,), device=device)

    def fresh():
        return {
            "topk": torch.zeros((num_labels, D), dtype=torch.int64, device=device),
            "positive": torch.zeros((num_labels, D), dtype=torch.int64, device=device),
            "mean": torch.zeros((num_labels, D), dtype=torch.float64, device=device),
            "m2": torch.zeros((num_labels, D), dtype=torch.float64, device=device),
        }

    table = table_entries(DEFAULT_STATS)
    backend = Backend(table, Params(1))

    def torch_fold(sums, batch, tokens, shift, flat):  # the backend keeps each statistic's totals apart
        backend.fold(sums, batch, tokens, shift, {s.name: {n: flat[n] for n in s.states} for s in table})

    ref, got = fresh(), fresh()
    torch_fold(sums, batch, tokens, shift, ref)
    fold_sums(sums, batch.labels, batch.counts, tokens, shift, got)
    same = all(torch.equal(ref[n], got[n]) for n in ("topk", "positive")) and all(
        torch.allclose(ref[n], got[n], rtol=1e-12, atol=1e-9) for n in ("mean", "m2")
    )
    totals = fresh()
    return (
        timed(lambda: torch_fold(sums, batch, tokens, shift, totals), device),
        timed(lambda: fold_sums(sums, batch.labels, batch.counts, tokens, shift, totals), device),
        same,
    )


class Table:
    """The rows of one kernel table: µs, TFLOP/s, GB/s and the share of the card's HBM bandwidth."""

    def __init__(self, device):
        self.rows, self.peak = [], hbm_peak(device)

    def add(self, name: str, t: float, flops: float = 0, byts: float = 0) -> None:
        gbs = byts / t / 1e9 if byts else 0
        share = f"{100 * gbs / self.peak:.0f}%" if self.peak and byts else ""
        self.rows.append(
            f"| {name} | {t * 1e6:,.1f} | {flops / t / 1e12 if flops else 0:,.1f} | {gbs:,.0f} | {share} |"
        )


def label_stats_rows(c, table: Table, y: torch.Tensor, tunings) -> dict:
    """``label_stats`` over the token rows of ``y``: one read; the split design's tuning sweeps, all statistics
    with its best tunings, per statistic and chunk size; the one-read design's sweep, its best against one
    read and per statistic (the best tunings of both left set); both designs on fp32 rows and the engine's
    choice; the torch statistics and the fold."""
    batch, U, k, shift, device, tok_bytes = c.batch, c.U, c.k, c.shift, c.device, c.tok_bytes

    def stats(
        rows_=batch.sorted_rows,
        local=batch.sorted_local,
        starts=batch.chunk_starts,
        chunks=batch.chunk_labels,
        rows=y,
        design="split",
        **which,
    ):
        return label_stats(rows, rows_, local, starts, chunks, U, k, shift, design=design, **which)

    out = {"read": timed(lambda: y.index_select(0, batch.index).sum(dtype=torch.float32), device)}
    table.add(
        f"one read of the {c.n_tok} token rows (index_select + sum: the memory floor)", out["read"], 0, 2 * tok_bytes
    )
    for name, run, which in (
        ("top-k only", lambda: stats(positive=False, moments=False), "topk"),
        ("positive + moments only", lambda: stats(topk=False), "sums"),
    ):
        times, best = sweep(run, tunings[which], device)
        out[which] = best
        for tuning, t in times:
            table.add(f"label_stats split, {name}, {tuning}", t, 0, tok_bytes)
    label_stats_module.TUNING.update({**out["topk"], **out["sums"]})
    out["all"] = timed(stats, device)
    table.add(
        f"label_stats split, all statistics, best tunings: {out['all'] / out['read']:.2f}x one read",
        out["all"],
        0,
        tok_bytes,
    )
    table.add("  of which positive counts alone", timed(lambda: stats(topk=False, moments=False), device), 0, tok_bytes)
    table.add("  of which moments alone", timed(lambda: stats(topk=False, positive=False), device), 0, tok_bytes)
    table.add(
        "  of which zeroing 4 per-batch buffers [labels, D]",
        timed(lambda: [torch.zeros((U, c.N), device=device) for _ in range(4)], device),
    )
    for chunk_rows in tunings["chunk_rows"]:
        work = [t.to(device) for t in chunk_tokens(batch.index.cpu(), batch.local.cpu(), chunk_rows)]
        t = timed(lambda: stats(*work), device)
        table.add(
            f"label_stats split, all statistics, chunks of <= {chunk_rows} rows ({work[3].numel()} chunks; engine: 32)",
            t,
            0,
            tok_bytes,
        )
    times, out["one_read"] = sweep(lambda: stats(design="one-read"), tunings["one_read"], device, tolerate=True)
    for tuning, t in times:
        if isinstance(t, str):
            table.rows.append(f"| label_stats one-read, all statistics, {tuning} | {t} | | | |")
        else:
            table.add(f"label_stats one-read, all statistics, {tuning}", t, 0, tok_bytes)
    ran = [t for _, t in times if not isinstance(t, str)]
    out["all_one_read"] = min(ran) if ran else None
    designs = DESIGNS if ran else ("split",)
    if ran:
        table.add(
            f"label_stats one-read, all statistics, best tuning: {out['all_one_read'] / out['read']:.2f}x one read",
            out["all_one_read"],
            0,
            tok_bytes,
        )
        for name, which in (("top-k", {"positive": False, "moments": False}), ("positive + moments", {"topk": False})):
            t = timed(lambda: stats(design="one-read", **which), device)
            table.add(f"  of which {name} alone", t, 0, tok_bytes)
    out["tuning"] = {**out["topk"], **out["sums"], **out["one_read"]}
    y32 = y.float()
    out["fp32"] = {}
    for design in designs:
        out["fp32"][design] = timed(lambda: stats(rows=y32, design=design), device)
        table.add(
            f"label_stats {design}, all statistics, fp32 rows (--stats-precision fp32), best tunings",
            out["fp32"][design],
            0,
            2 * tok_bytes,
        )
    out["torch"] = timed(lambda: torch_sums(y.index_select(0, batch.index), batch.local, U, k, shift), device)
    table.add("torch statistics on the token rows (index_select + topk + index_add)", out["torch"], 0, tok_bytes)
    out["sums_of_y"] = {design: stats(design=design) for design in designs}
    out["fold_torch"], out["fold"], out["fold_same"] = fold_check(
        out["sums_of_y"]["split"], batch, c.labels, c.N, shift, device
    )
    table.add(f"fold of the batch sums into the totals ({U} labels), torch ops", out["fold_torch"])
    table.add(f"fold of the batch sums into the totals ({U} labels), fold_sums kernel", out["fold"])
    return out


def engine_choice(device, dtype, width: int, k: int) -> str:
    """The design the engine's start-of-run timing picks with the current tunings (all statistics), for
    fp32 and for model-precision statistics."""
    parts = []
    for precision in ("fp32", "model"):
        backend = make_backend("triton", table_entries(DEFAULT_STATS), Params(k), precision=precision)
        chosen = choose_design("auto", backend, device, dtype, width)
        times = ", ".join(f"{d} {us:,.1f} µs" for d, us in (chosen.microseconds or {}).items())
        parts.append(f"{precision} statistics: {chosen.design}, {chosen.reason}{' (' + times + ')' if times else ''}")
    return "- the engine's choice (`label_stats_design` auto: timed at the start of a run): " + "; ".join(parts)


def fp32_rows(c, table: Table, configs) -> dict:
    """``ffn_up_stats`` in each tile shape (the best one kept), without statistics and with an fp32 output;
    the fp32 route of the torch/triton backends."""
    x, w, b, batch, U, shift, device = c.x, c.w, c.b, c.batch, c.U, c.shift, c.device
    out = {}
    for tiles in configs:
        try:
            t = timed(
                lambda: ffn_up_stats(x, w, b, "gelu", batch.perm, batch.sorted_local, U, shift, tiles=tiles), device
            )
        except Exception as e:  # a tile shape that does not fit this card's resources
            table.rows.append(f"| ffn_up_stats {tiles} | failed: {type(e).__name__} | | |")
            continue
        table.add(f"ffn_up_stats {tiles} (GEMM+GELU+positive/moments)", t, c.flops, c.io)
        if "fused" not in out or t < out["fused"]:
            out["fused"], out["tiles"] = t, tiles
    if "fused" not in out:
        raise SystemExit("no ffn_up_stats tile shape ran on this card")

    def fused(**kw):
        return ffn_up_stats(x, w, b, "gelu", batch.perm, batch.sorted_local, U, shift, tiles=out["tiles"], **kw)

    table.add(
        "ffn_up_stats, best tiles, without the epilogue statistics",
        timed(lambda: fused(stats=False), device),
        c.flops,
        c.io,
    )
    out["fused32"] = timed(lambda: fused(out_dtype=torch.float32)[0].to(x.dtype), device)
    table.add(
        "ffn_up_stats, best tiles, fp32 output rounded for W2 (precision fp32, fused)",
        out["fused32"],
        c.flops,
        c.io + c.M * c.N * 6,
    )
    ffn = ffn_of(w, b)
    out["route"] = timed(lambda: ffn.act(fp32_preactivation(ffn.up, x).to(x.dtype)), device)
    name = "fp32 route: one GEMM with an fp32 output, bias in fp32, rounded, GELU (the model's path, precision fp32)"
    table.add(name, out["route"], c.flops, c.io + c.M * c.N * 8)
    pre = fp32_preactivation(ffn.up, x)
    out["rows32"] = timed(lambda: ffn.act(pre.index_select(0, batch.index)), device)
    table.add(
        f"fp32 route: fp32 GELU of the {c.n_tok} token rows (the statistics' input)",
        out["rows32"],
        0,
        16 * c.n_tok * c.N,
    )
    out["y_fused"] = fused()[0]
    return out


def kernel_inputs(device, dtype, M, K, N, k, labels, token_fraction, rng) -> SimpleNamespace:
    """Random FFN inputs, the model's activations ``y`` and a token batch of ``token_fraction`` of the rows."""
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = (torch.randn(N, device=device) * 0.1).to(dtype)
    lab = torch.from_numpy(np.where(rng.random(M) < token_fraction, rng.integers(0, labels, M), -1))
    batch = TokenBatch.from_labels(lab.numpy()).to(device)
    c = SimpleNamespace(x=x, w=w, b=b, batch=batch, U=batch.labels.numel(), k=k, M=M, N=N, labels=labels, device=device)
    c.shift, c.n_tok = torch.zeros(N, device=device), batch.num_tokens
    c.flops, c.io = 2 * M * N * K, (M * K + N * K + M * N) * x.element_size()
    c.tok_bytes = c.n_tok * N * x.element_size()
    c.y = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    return c


def designs_table(c, tunings) -> tuple[list[str], list[str], dict]:
    """The ``label_stats`` table of :func:`label_stats_rows` with each design's counts checked against the
    torch statistics on the card; exits when a count differs."""
    designs = Table(c.device)
    ls = label_stats_rows(c, designs, c.y, tunings)
    ref = torch_sums(c.y.index_select(0, c.batch.index), c.batch.local, c.U, c.k, c.shift)
    same, s1_err = {}, {}
    for design, sums in ls["sums_of_y"].items():
        same[design] = all(torch.equal(sums[n].long(), ref[n].round().long()) for n in ("topk", "positive"))
        s1_err[design] = f"{((sums['s1'] - ref['s1']).norm() / ref['s1'].norm()).item():.1e}"
    if not (all(same.values()) and ls["fold_same"]):
        raise SystemExit("the kernels' counts or folded totals differ from the torch ones on the same activations")
    one_read = ls["all_one_read"]
    ls["fastest"] = "one-read" if one_read is not None and one_read < ls["all"] else "split"
    ls["best"] = min(ls["all"], one_read or ls["all"])
    notes = [
        f"- label_stats counts == torch counts: {same}; s1 relative difference {s1_err}; fold_sums == torch "
        f"fold: {ls['fold_same']}",
        f"- label_stats with all statistics, best tunings: split {ls['all'] / ls['read']:.2f}x, one-read "
        + (f"{one_read / ls['read']:.2f}x" if one_read else "failed on this card")
        + f" one read of the token rows (target <= 2x; faster here: {ls['fastest']}); on fp32 rows "
        + ", ".join(f"{d} {t * 1e6:,.0f} µs" for d, t in ls["fp32"].items()),
        engine_choice(c.device, c.x.dtype, c.N, c.k),
    ]
    return designs.rows, notes, ls


def gemm_table(c, configs, ls: dict) -> tuple[list[str], list[str], dict]:
    """cuBLAS GEMM (+ GELU), ``ffn_up_stats`` and the fp32 route (:func:`fp32_rows`), with the per-layer
    costs against the best ``label_stats`` of ``ls``; returns the rows, notes and the best fused tiles."""
    x, w, b, device = c.x, c.w, c.b, c.device
    table = Table(device)
    table.add(
        "cuBLAS GEMM + bias (F.linear)", timed(lambda: torch.nn.functional.linear(x, w, b), device), c.flops, c.io
    )
    t_act = timed(lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), device)
    table.add("cuBLAS GEMM + GELU (the model's path)", t_act, c.flops, c.io + 2 * c.M * c.N * x.element_size())
    fp = fp32_rows(c, table, configs)
    err = ((fp["y_fused"].float() - c.y.float()).norm() / c.y.float().norm()).item()
    notes = [
        f"- fused y vs cuBLAS+GELU y: relative error {err:.2e}",
        f"- fp32 precision costs {(fp['route'] - t_act + fp['rows32']) * 1e6:,.0f} µs per layer over the "
        f"model's path (fp32 route: {(fp['route'] - t_act) * 1e6:,.0f} µs in the forward, "
        f"{fp['rows32'] * 1e6:,.0f} µs of fp32 GELU on the token rows) or "
        f"{(fp['fused32'] - fp['fused']) * 1e6:,.0f} µs more than the bf16 fused kernel",
        f"- per layer for this batch: model path {t_act * 1e6:,.0f} µs; + label_stats ({ls['fastest']}) "
        f"{ls['best'] * 1e6:,.0f} µs + fold {ls['fold'] * 1e6:,.0f} µs = "
        f"{100 * (ls['best'] + ls['fold']) / t_act:.1f}% of it; torch statistics {ls['torch'] * 1e6:,.0f} µs + "
        f"torch fold {ls['fold_torch'] * 1e6:,.0f} µs; best fused {fp['fused'] * 1e6:,.0f} µs",
    ]
    return table.rows, notes, fp["tiles"]


def membership_shift(got: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """Share of the reference's top-k memberships that ``got`` lacks, and the mean neuron index of the
    memberships gained and of those lost (counts or masks over [..., neuron])."""
    diff = got.astype(np.int64) - ref.astype(np.int64)
    axes = tuple(range(diff.ndim - 1))
    gained, lost = np.clip(diff, 0, None).sum(axes), np.clip(-diff, 0, None).sum(axes)
    index = np.arange(diff.shape[-1])

    def mean(c):
        return float(c @ index / c.sum()) if c.sum() else float("nan")

    return float(lost.sum() / max(ref.sum(), 1)), mean(gained), mean(lost)


def describe_shift(name: str, shift: tuple[float, float, float], width: int, memberships: int) -> str:
    frac, gained, lost = shift
    lost_n = frac * memberships
    noise = width / np.sqrt(12 * max(lost_n, 1))  # std of a mean of lost_n uniform indices
    return f"| {name} | {100 * frac:.3f}% | {gained:,.0f} | {lost:,.0f} | {gained - lost:+,.0f} | ±{2 * noise:,.0f} |"


def route_check(up: torch.nn.Linear, x: torch.Tensor) -> tuple[float, float, bool]:
    """The fp32 route's pre-activations against the stock ones on FFN inputs ``x``: the share that differ,
    the largest difference in ulps of the model's dtype, and whether :data:`ROUTE_BOUND` holds."""
    stock, ours = up(x).double(), fp32_preactivation(up, x).to(x.dtype).double()
    big = torch.maximum(stock.abs(), ours.abs()).clamp_min(torch.finfo(x.dtype).smallest_normal)
    ulp = torch.exp2(torch.floor(torch.log2(big))) * torch.finfo(x.dtype).eps
    slack = 2 * (x.shape[1] + 1) * 2.0**-24 * (x.double().abs() @ up.weight.double().abs().T + up.bias.double().abs())
    diff = (stock - ours).abs()
    return (diff > 0).double().mean().item(), (diff / ulp).max().item(), bool((diff <= ulp + slack).all())


def whole_runs(half, full, batches, k, num_labels, device, backend) -> tuple[dict, dict]:
    """Top-k counts and last hidden states of whole runs: the fp32 twin, and the half model with each
    statistics precision."""
    counts, outputs = {}, {}
    for label, adapter, precision in (
        ("fp32", full, "model"),
        ("half-fp32", half, "fp32"),
        ("half-model", half, "model"),
    ):
        act = str(adapter.config.hidden_act)
        acc = Accumulator(adapter.num_layers, num_labels, half.width, k, ("topk",), device, backend, act, precision)
        current, outputs[label] = {}, []
        with torch.no_grad(), adapter.instrument(lambda i, f, h: acc.ffn_activation(i, f, h, current["b"])):
            for waves, batch, _ in batches:
                current["b"] = batch.to(device)
                outputs[label].append(adapter.encode(waves)[0].double())
        counts[label] = acc.compute()["topk_count"]
    return counts, outputs


def same_x_study(half, waves, first, k) -> tuple[dict, dict, list, list]:
    """On the FFN inputs x the half model feeds its layers (the token rows of the first batch): top-k masks
    of its activations, of the fp32 statistics and of float64 act(x W1ᵀ + b1); the share of rows tied at
    the k-th |a|; the fp32 route's :func:`route_check` per layer."""
    inputs = {}

    def capture(layer, ffn, h):
        inputs[layer] = h.reshape(-1, h.shape[-1]).index_select(0, first.index)
        return ffn.act(ffn.up(h))

    with torch.no_grad(), half.instrument(capture):
        half.encode(waves)
    masks = {"model": [], "fp32": [], "exact": []}
    tied, route = [], []
    with torch.no_grad():
        for layer, x in sorted(inputs.items()):
            ffn = half.ffns[layer]
            route.append(route_check(ffn.up, x))
            w, b = ffn.up.weight.double(), ffn.up.bias.double()
            model_a = ffn.act(ffn.up(x))
            masks["exact"].append(topk_mask_reference(ffn.act(x.double() @ w.T + b), k).cpu().numpy())
            masks["model"].append(topk_mask_reference(model_a, k).cpu().numpy())
            masks["fp32"].append(topk_mask_reference(fp32_activations(ffn, x), k).cpu().numpy())
            kth = model_a.abs().float().sort(dim=1, descending=True).values[:, k - 1 : k]
            tied.append(((model_a.abs().float() == kth).sum(1) > 1).float().mean().item())
    return inputs, masks, tied, route


def precision_study(model, dtype, feature_ext, batches, k, num_labels, device, backend) -> list[str]:
    """Top-k memberships in a ``dtype`` run: the model-precision and fp32-precision statistics against
    act(x W1ᵀ + b1) in float64 on the FFN inputs x the ``dtype`` model feeds its layers, and whole runs
    against an fp32 forward of the same (rounded) weights."""
    half = adapter_for(copy.deepcopy(model).to(device, dtype), feature_ext, "half")
    full = adapter_for(copy.deepcopy(model).to(device, dtype).float(), feature_ext, "fp32 twin")
    D = half.width
    first = batches[0][1].to(device)
    inputs, masks, tied, route = same_x_study(half, batches[0][0], first, k)
    masks = {n: np.stack(m) for n, m in masks.items()}
    memberships = int(masks["exact"].sum())
    name = str(dtype).removeprefix("torch.")
    lines = [
        "",
        f"Precision study ({name}, {len(inputs)} layers x {first.num_tokens} token rows, k = {k} of {D}): "
        f"{100 * np.mean(tied):.1f}% of the {name} rows tie at the k-th |a|.",
        "",
        "| top-k memberships | differ from the reference | mean index gained | lost | gained − lost | 2σ noise |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        describe_shift(
            f"{name} activations vs float64 act(x W1ᵀ + b1), same x (target ~0.3%)",
            membership_shift(masks["model"], masks["exact"]),
            D,
            memberships,
        ),
        describe_shift(
            "--stats-precision fp32 vs float64, same x (target <= 0.05%)",
            membership_shift(masks["fp32"], masks["exact"]),
            D,
            memberships,
        ),
    ]
    differ, worst, within = (np.mean([r[0] for r in route]), max(r[1] for r in route), all(r[2] for r in route))
    notes = [
        "",
        f"- fp32 route (one GEMM with an fp32 output, its {name} rounding feeds the model): {100 * differ:.4f}% "
        f"of the pre-activations differ from the stock {name} ones, by at most {worst:.2f} ulp; the stated bound "
        f"({ROUTE_BOUND}) holds: {within}",
    ]
    counts, outputs = whole_runs(half, full, batches, k, num_labels, device, backend)
    with torch.no_grad():
        stock = [half.encode(waves)[0].double() for waves, _, _ in batches]
    moved = sum((a - b).norm() ** 2 for a, b in zip(outputs["half-fp32"], stock)).sqrt().item()
    own = sum((a - b).norm() ** 2 for a, b in zip(outputs["fp32"], stock)).sqrt().item()
    notes.append(
        f"- whole model, last hidden state: the {name} run with fp32 statistics differs from the stock {name} "
        f"forward by {moved / max(own, 1e-30):.4f} of the stock forward's own difference from an fp32 forward "
        f"(tests/test_precision.py: <= 0.02 on CPU)"
    )
    whole = int(counts["fp32"].sum())
    for label, text in (("half-model", f"{name} run, --stats-precision model"), ("half-fp32", f"{name} run, fp32")):
        lines.append(
            describe_shift(
                f"whole run: {text} vs an fp32 forward (net per cell)",
                membership_shift(counts[label], counts["fp32"]),
                D,
                whole,
            )
        )
    return lines + notes


STAT_KERNELS = (
    "_topk_kernel",
    "_sums_kernel",
    "_one_read_kernel",
    "_chunk_reduce_kernel",
    "_fold_kernel",
    "_ffn_up_stats_kernel",
)


def device_profile(run, device) -> list[str]:
    """Where one pass spends its device time (CPU time in the smoke run): the share of the statistics
    kernels — wall-clock ratios between runs are noisier than this — and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run()
        sync(device)
    events = [
        (e.key, e.self_device_time_total if cuda else e.self_cpu_time_total, e.count) for e in prof.key_averages()
    ]
    events = sorted((e for e in events if e[1] > 0), key=lambda e: -e[1])
    total = sum(t for _, t, _ in events)
    ours = [(name, t, n) for name, t, n in events if name.startswith(STAT_KERNELS)]
    lines = [
        f"- {'device' if cuda else 'CPU'} time of one pass: {total / 1e3:,.1f} ms; the statistics kernels: "
        f"{sum(t for _, t, _ in ours) / 1e3:,.2f} ms = {100 * sum(t for _, t, _ in ours) / max(total, 1):.2f}% "
        f"({', '.join(f'{name} {t / 1e3:,.2f} ms in {n} launches' for name, t, n in ours) or 'none seen'})",
        "",
        "| costliest kernels of that pass | ms | launches | share |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| `{name[:90]}` | {t / 1e3:,.2f} | {n} | {100 * t / total:.1f}% |" for name, t, n in events[:12]]
    return lines


def engine_runs(adapter, batches, k, num_labels, variants, device, repeat, profiled):
    """Median seconds of one pass over ``batches`` per variant (the variants take turns in every round),
    their states, and notes: the variants that failed on this card, the device profile of one pass of
    the variant ``profiled``."""
    D, L = adapter.width, adapter.num_layers

    def one_pass(variant):
        if variant is None:
            for waves, _, _ in batches:
                adapter.encode(waves)
            return None
        backend, _, precision = variant.partition("@")
        backend, _, design = backend.partition(":")
        name = backend.removesuffix("+inline")
        act = str(adapter.config.hidden_act)
        acc = Accumulator(
            L,
            num_labels,
            D,
            k,
            device=device,
            backend="torch" if name == "compile" else name,
            activation=act,
            precision=precision or "fp32",
            overlap=False if backend.endswith("+inline") else None,  # None: the engine's default
            design=design or None,
        )
        if name == "compile":
            acc.backend = CompiledTorchBackend(acc.table, acc.params, act)
        current = {}
        with adapter.instrument(lambda i, f, h: acc.ffn_activation(i, f, h, current["b"])):
            for waves, batch, _ in batches:
                current["b"] = batch.to(device)
                adapter.encode(waves)
        acc.side.join()  # the pass ends when its statistics do
        return acc

    states, notes = {}, []
    for name, backend in variants:  # warm-up: compiles the kernels
        try:
            states[name] = one_pass(backend)
        except Exception as e:  # a design option failing on this card must not cost the other measurements
            notes.append(f"- {name} failed: {type(e).__name__}: {e}")
    variants = [(name, backend) for name, backend in variants if name in states]
    times = {name: [] for name, _ in variants}
    for _ in range(repeat):
        for name, backend in variants:
            sync(device)
            times[name].append(once(lambda: one_pass(backend), device))
    notes += [
        "",
        f"Profile of one pass, {profiled}:",
        "",
        *device_profile(lambda: one_pass(dict(variants)[profiled]), device),
    ]
    return {name: statistics.median(t) for name, t in times.items()}, states, notes


TOPK_KEYS = ("search_rows", "search_warps")
SUMS_KEYS = ("block_n", "rows", "num_warps", "two_pass")
ONE_READ_KEYS = ("one_read_rows", "one_read_tiles", "one_read_digit", "one_read_warps")


def sweep_tunings(smoke: bool) -> dict[str, list[dict]]:
    """The ``label_stats`` tunings each kernel table sweeps (the split design's knobs around the H200's best;
    the one-read design's around its first guess: rows per tile, tiles per program, radix digit — 1 is the
    bitwise search —, warps) and the chunk sizes it tries (the smoke run: one or two of each kind, the
    interpreter is slow)."""
    topk = ((2, 4),) if smoke else ((1, 4), (1, 8), (2, 4), (4, 8))
    sums = (
        ((16, 4, 4, False), (16, 2, 4, True))
        if smoke
        else ((1024, 4, 8, False), (512, 8, 8, False), (256, 8, 4, False), (1024, 4, 8, True))
    )
    one_read = (
        ((2, 2, 8, 4), (4, 1, 1, 4))
        if smoke
        else (
            (4, 8, 4, 8),
            (4, 8, 1, 8),
            (4, 8, 2, 8),
            (4, 8, 8, 8),
            (2, 16, 4, 4),
            (8, 4, 4, 16),
            (4, 32, 4, 8),
            (4, 2, 4, 8),
        )
    )
    return {
        "topk": [dict(zip(TOPK_KEYS, t)) for t in topk],
        "sums": [dict(zip(SUMS_KEYS, t)) for t in sums],
        "one_read": [dict(zip(ONE_READ_KEYS, t)) for t in one_read],
        "chunk_rows": (8,) if smoke else (8, 128, 512),
    }


FUSED_TILES = [
    {"block": (64, 128, 64), "num_warps": 4, "num_stages": 4, "group_m": 8},
    {"block": (128, 128, 64), "num_warps": 8, "num_stages": 3, "group_m": 8},
    {"block": (128, 128, 64), "num_warps": 4, "num_stages": 4, "group_m": 8},
]
"""``ffn_up_stats`` tile shapes to try on a card ((128, 256, 64) ran out of resources on the H200)."""


def engine_variants(device: str, compile_: bool) -> list[tuple[str, str | None]]:
    """(row name, ``backend[+inline][@precision]``) of the engine runs; the side stream is the default on CUDA."""
    variants = [("plain forward", None), ("collect, torch backend", "torch")]
    if compile_:
        variants.append(("collect, torch.compile of the torch statistics", "compile"))
    variants += [
        ("collect, triton backend", "triton"),
        ("collect, triton backend, one-read label_stats", "triton:one-read"),
        ("collect, triton backend, --stats-precision model", "triton@model"),
    ]
    if device == "cuda":
        variants += [
            ("collect, triton backend, statistics in line (no side stream)", "triton+inline"),
            ("collect, triton backend, --stats-precision model, statistics in line", "triton+inline@model"),
        ]
    variants += [
        ("collect, triton-fused backend", "triton-fused"),
        ("collect, triton-fused backend, --stats-precision model", "triton-fused@model"),
    ]
    return variants


def engine_table(adapter, batches, k, num_labels, device, repeat, compile_, mode, seconds) -> str:
    """One engine-level table (tokens ``mode``): times per variant, the counts checked against the torch
    backend, the fp32-precision and side-stream costs, and the device profile of one ``triton`` pass."""
    frames = sum(b[2] for b in batches)
    tokens = sum(b[1].num_tokens for b in batches)
    profiled = "collect, triton backend"
    variants = engine_variants(device, compile_)
    times, states, notes = engine_runs(adapter, batches, k, num_labels, variants, device, repeat, profiled)
    ref = states["collect, torch backend"].compute()
    check = []
    for name in (n for n in times if n.startswith("collect, triton")):
        got = states[name].compute()
        diff = int(np.abs(got["topk_count"] - ref["topk_count"]).sum())
        pos = int(np.abs(got["positive_count"] - ref["positive_count"]).sum())
        seen = ref["frames"] > 0
        err = {
            v: float(np.abs(got[v] - ref[v])[:, seen].max() / np.abs(ref[v])[:, seen].max()) for v in ("mean", "var")
        }
        check.append(
            f"{name.removeprefix('collect, ')}: top-k counts differing from torch: {diff} of "
            f"{int(ref['topk_count'].sum())}, positive counts: {pos}; mean, var max difference / max value: "
            f"{err['mean']:.1e}, {err['var']:.1e}"
        )
    base = times["plain forward"]
    lines = [
        "",
        f"Engine level, tokens {mode}: {len(batches)} batches x {len(batches[0][0])} utterances of "
        f"~{seconds:g} s, {frames} frames, {tokens} tokens, all statistics",
        "",
        "| run | seconds | frames/s | vs plain |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {name} | {t:.4f} | {frames / t:,.0f} | {t / base:.3f} |" for name, t in times.items()),
        "",
        "- " + "; ".join(check),
        *cost_notes(times, mode),
        *notes,
    ]
    return "\n".join(lines) + "\n"


def cost_notes(times: dict[str, float], mode: str) -> list[str]:
    """The issue's engine targets: collect/plain, fp32 precision over model precision, the side stream."""
    base, t = times["plain forward"], times.get
    target = 1.05 if mode == "phone-mid" else 1.10
    out = []
    if t("collect, triton backend"):
        out.append(
            f"- collect (triton, fp32 precision, defaults) / plain: {t('collect, triton backend') / base:.3f} "
            f"(target <= {target:.2f})"
        )
    if t("collect, triton backend") and t("collect, triton backend, --stats-precision model"):
        extra = t("collect, triton backend") - t("collect, triton backend, --stats-precision model")
        out.append(
            f"- fp32 precision over model precision: {100 * extra / base:+.1f}% of the plain forward (target <= 5%)"
        )
    one_read = t("collect, triton backend, one-read label_stats")
    if one_read and t("collect, triton backend"):
        out.append(
            f"- collect with the one-read label_stats / with split: {one_read / t('collect, triton backend'):.3f} "
            f"(the side stream hides part of either)"
        )
    inline = t("collect, triton backend, statistics in line (no side stream)")
    if inline and t("collect, triton backend"):
        saved = inline - t("collect, triton backend")
        out.append(f"- the side stream (the default on CUDA) saves {100 * saved / base:+.1f}% of the plain forward")
    return out


def arguments() -> argparse.Namespace:
    """The options (``--smoke``: one repeat, no results file)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check of the script)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--per-batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds of the engine runs")
    ap.add_argument(
        "--compile", action="store_true", help="also time torch.compile of the torch statistics (slow to warm up)"
    )
    ap.add_argument("--kernels-only", action="store_true", help="only the kernel-level tables and the precision study")
    ap.add_argument(
        "--designs-only", action="store_true", help="only the label_stats tables (both designs, both token shares)"
    )
    ap.add_argument(
        "--engine-only", action="store_true", help="only the engine runs, with the kernels' default tunings"
    )
    ap.add_argument("--results", default=str(RESULTS), help="append the tables here ('' for none)")
    ap.add_argument("--out", default=None, help="also write the tables here")
    args = ap.parse_args()
    if args.smoke:
        args.results, args.repeat = "", 1
        TIMING.update(repeat=1, warmup=0)
    return args


def main() -> None:
    args = arguments()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rng = np.random.default_rng(0)
    size = "tiny" if args.smoke else "base"
    model = build_model("hubert", size, **({"num_hidden_layers": 2, "intermediate_size": 40} if args.smoke else {}))
    adapter = adapter_for(model.to(device, dtype), feature_extractor(), f"random HuBERT-{size}")
    D, H = adapter.width, adapter.config.hidden_size
    k = max(1, round(0.01 * D))
    num_labels = 41 * 2 * 4
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke run)"

    def done(text: str) -> None:  # each table printed and appended the moment it is finished
        emit(text + f"\n- ({time.perf_counter() - started:.0f} s since the bench started)\n", args.results, args.out)

    emit(
        f"\n### kernel_bench on {card}\n\n- torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"CUDA {torch.version.cuda}; {str(dtype).removeprefix('torch.')}; label_stats designs: {', '.join(DESIGNS)} "
        f"(engine runs: split unless named)\n",
        args.results,
        args.out,
    )
    M = 16 * 750 if not args.smoke else 70
    configs = FUSED_TILES if not args.smoke else [dict(fused.INTERPRETER_TILES)]
    tunings = sweep_tunings(args.smoke)
    tables = ((0.2, "phone-mid-like, 20% token rows"), (1.0, "all rows are tokens"))
    tables = () if args.engine_only else tables[1:] if args.smoke else tables
    inputs = {frac: kernel_inputs(device, dtype, M, H, D, k, num_labels, frac, rng) for frac, _ in tables}

    def kernel_done(title: str, name: str, rows: list[str], notes: list[str]) -> None:
        head = f"Kernel level, {title}: M = {M} rows, K = {H}, N = {D}, k = {k}, {name}"
        table = ["", head, "", "| kernel | µs | TFLOP/s | GB/s | of HBM |", "| --- | ---: | ---: | ---: | ---: |"]
        done("\n".join(table + rows + ["", *notes]))

    found = {}  # the label_stats designs of every table first: what a cut run must keep
    for frac, name in tables:
        rows, notes, found[frac] = designs_table(inputs[frac], tunings)
        kernel_done("label_stats, both designs", name, rows, notes)
    if args.designs_only:
        return
    chosen = {}
    for frac, name in tables:
        label_stats_module.TUNING.update(found[frac]["tuning"])
        rows, notes, tiles = gemm_table(inputs[frac], configs, found[frac])
        kernel_done("GEMMs, the fused kernel and the fp32 route", name, rows, notes)
        chosen[frac] = (tiles, found[frac]["tuning"])
    tiles, tuning = chosen.get(1.0, (fused.TILES, label_stats_module.TUNING))
    fused.TILES.update(tiles)
    label_stats_module.TUNING.update(tuning)
    how = "best with all rows as tokens" if chosen else "the defaults"
    tuned = f"\n- tunings for the engine runs ({how}): ffn_up_stats {tiles}; label_stats {tuning}"
    if not args.engine_only:
        study_dtype = torch.float16 if args.smoke else torch.bfloat16
        study = make_batches(adapter, 2, 2 if args.smoke else 8, 0.5 if args.smoke else 15.0, "all", rng)
        backend = "triton" if device == "cuda" else "torch"
        done(
            tuned
            + "\n".join(
                precision_study(model, study_dtype, adapter.feature_extractor, study, k, num_labels, device, backend)
            )
        )
    if args.kernels_only:
        return
    seconds = args.seconds if not args.smoke else 0.5
    for mode in ("phone-mid", "all") if not args.smoke else ("all",):
        n_batches, per_batch = (args.batches, args.per_batch) if not args.smoke else (1, 2)
        batches = make_batches(adapter, n_batches, per_batch, seconds, mode, rng)
        done(engine_table(adapter, batches, k, num_labels, device, args.repeat, args.compile, mode, seconds))


if __name__ == "__main__":
    main()
