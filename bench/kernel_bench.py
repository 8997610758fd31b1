"""GPU benchmark of the statistics kernels and the engine's backends, one process, one card.

Kernel level (HuBERT-base FFN geometry, bf16): cuBLAS GEMM alone; cuBLAS GEMM + GELU (the model's
own path); one read of the token rows (the memory floor); `label_stats` over the token rows (the
one-read `chunk` design's radix digits and warps, the `split` design's top-k and sums kernels, each
swept, then per statistic and per chunk size); the torch statistics on the same rows; the fold of a
layer's batch sums into the totals (torch ops vs the `fold_sums` kernel); `ffn_up_stats` (GEMM + GELU
+ positive/moment epilogue) in a few tile shapes, with bf16 and fp32 output; the fp32 recomputation
of the token rows (`--stats-precision fp32`).  Achieved TFLOP/s, GB/s and % of the card's HBM bandwidth.

Precision study: the FFN inputs x a bf16 HuBERT-base feeds its layers; the top-k memberships of the
bf16 activations and of the fp32-precision statistics against act(x W1ᵀ + b1) in float64, with the
mean neuron index of the memberships gained and lost; then whole runs (bf16 forward with each
precision against an fp32 forward of the same weights).

Engine level: batches of ~16 x 15 s of random audio through a random HuBERT-base in bf16, with
random phone-like labels (runs of 2-8 frames): the plain forward vs the torch backend vs
`torch.compile` of the torch statistics vs `triton` (also with its statistics on a side CUDA stream,
a design option) vs `triton-fused`, each with fp32-precision statistics (the default) and the triton
ones also with model precision; frames/s and ratios, and a device profile of one `triton` pass.
Counts of the torch and triton backends are checked equal on the same activations.

    python bench/kernel_bench.py                    # on a CUDA machine; appends to bench/RESULTS.md
    TRITON_INTERPRET=1 python bench/kernel_bench.py --smoke   # tiny shapes on CPU, checks the script
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import numpy as np
import torch
from benchutil import RESULTS, TIMING, emit, once, sync, timed

import neurostat.kernels.ffn_up_stats as fused
import neurostat.kernels.label_stats as label_stats_module
from neurostat.declarations import DEFAULT_STATS
from neurostat.engine.accumulate import Accumulator
from neurostat.engine.backends import Backend, fp32_activations
from neurostat.engine.batching import TokenBatch, chunk_tokens
from neurostat.engine.statistics import Params, topk_mask
from neurostat.engine.statistics import statistics as table_entries
from neurostat.kernels.ffn_up_stats import ffn_up_stats
from neurostat.kernels.fold_sums import fold_sums
from neurostat.kernels.label_stats import label_stats
from neurostat.kernels.reference import topk_mask_reference
from neurostat.model.adapter import FFN, ModelAdapter
from neurostat.model.factory import build_model, feature_extractor


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


def sweep(run, tunings, device) -> tuple[list[tuple[dict, float]], dict]:
    """Times ``run()`` under each ``label_stats`` tuning; returns the times and the fastest tuning (left set)."""
    times = []
    for tuning in tunings:
        label_stats_module.TUNING.update(tuning)
        times.append((tuning, timed(run, device)))
    best = min(times, key=lambda item: item[1])[0]
    label_stats_module.TUNING.update(best)
    return times, dict(best)


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


def kernel_table(device, dtype, M, K, N, k, labels, token_fraction, rng, configs, tunings) -> tuple:
    x = torch.randn(M, K, device=device, dtype=dtype)
    w = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = (torch.randn(N, device=device) * 0.1).to(dtype)
    lab = torch.from_numpy(np.where(rng.random(M) < token_fraction, rng.integers(0, labels, M), -1))
    batch = TokenBatch.from_labels(lab.numpy()).to(device)
    U = batch.labels.numel()
    shift = torch.zeros(N, device=device)
    n_tok = batch.num_tokens
    flops = 2 * M * N * K
    io = (M * K + N * K + M * N) * x.element_size()
    tok_bytes = n_tok * N * x.element_size()
    rows = []
    peak = hbm_peak(device)

    def add(name, t, f=0, byts=0):
        gbs = byts / t / 1e9 if byts else 0
        share = f"{100 * gbs / peak:.0f}%" if peak and byts else ""
        rows.append(f"| {name} | {t * 1e6:,.1f} | {f / t / 1e12 if f else 0:,.1f} | {gbs:,.0f} | {share} |")

    t_gemm = timed(lambda: torch.nn.functional.linear(x, w, b), device)
    add("cuBLAS GEMM + bias (F.linear)", t_gemm, flops, io)
    y = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    t_act = timed(lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), device)
    add("cuBLAS GEMM + GELU (the model's path)", t_act, flops, io + 2 * M * N * x.element_size())

    def stats(
        rows_=batch.sorted_rows, local=batch.sorted_local, starts=batch.chunk_starts, chunks=batch.chunk_labels, **which
    ):
        return label_stats(y, rows_, local, starts, chunks, U, k, shift, **which)

    t_read = timed(lambda: y.index_select(0, batch.index).sum(dtype=torch.float32), device)
    add(f"one read of the {n_tok} token rows (index_select + sum: the memory floor)", t_read, 0, 2 * tok_bytes)
    topk_times, best_topk = sweep(lambda: stats(positive=False, moments=False), tunings["topk"], device)
    for tuning, t in topk_times:
        add(f"label_stats, top-k only, {tuning}", t, 0, tok_bytes)
    sums_times, best_sums = sweep(lambda: stats(topk=False), tunings["sums"], device)
    for tuning, t in sums_times:
        add(f"label_stats, positive + moments only, {tuning}", t, 0, tok_bytes)
    split = {**best_sums, **{n: v for n, v in best_topk.items() if n != "design"}, "design": "split"}
    all_times, best_all = sweep(stats, [split, *tunings["all"]], device)
    for tuning, t in all_times:
        add(f"label_stats, all statistics, {tuning}", t, 0, tok_bytes)
    t_ts = timed(stats, device)
    add(f"label_stats, all statistics, best ({best_all['design']}): {t_ts / t_read:.2f}x one read", t_ts, 0, tok_bytes)
    add("  of which positive counts alone", timed(lambda: stats(topk=False, moments=False), device), 0, tok_bytes)
    add("  of which moments alone", timed(lambda: stats(topk=False, positive=False), device), 0, tok_bytes)
    add(
        "  of which zeroing 4 per-batch buffers [labels, D]",
        timed(lambda: [torch.zeros((U, N), device=device) for _ in range(4)], device),
    )
    for chunk_rows in (8, 128, 512):
        rows_c, local_c, starts_c, labels_c = (
            t.to(device) for t in chunk_tokens(batch.index.cpu(), batch.local.cpu(), chunk_rows)
        )
        t = timed(lambda: stats(rows_=rows_c, local=local_c, starts=starts_c, chunks=labels_c), device)
        add(
            f"label_stats, all statistics, chunks of <= {chunk_rows} rows ({labels_c.numel()} chunks; engine: 32)",
            t,
            0,
            tok_bytes,
        )
    t_torch = timed(lambda: torch_sums(y.index_select(0, batch.index), batch.local, U, k, shift), device)
    add("torch statistics on the token rows (index_select + topk + index_add)", t_torch, 0, tok_bytes)
    sums = stats()
    t_fold_torch, t_fold, fold_same = fold_check(sums, batch, labels, N, shift, device)
    add(f"fold of the batch sums into the totals ({U} labels), torch ops", t_fold_torch)
    add(f"fold of the batch sums into the totals ({U} labels), fold_sums kernel", t_fold)
    best = None
    for tiles in configs:
        run = lambda: ffn_up_stats(x, w, b, "gelu", batch.perm, batch.sorted_local, U, shift, tiles=tiles)  # noqa: E731
        try:
            t = timed(run, device)
        except Exception as e:  # a tile shape that does not fit this card's resources
            rows.append(f"| ffn_up_stats {tiles} | failed: {type(e).__name__} | | |")
            continue
        add(f"ffn_up_stats {tiles} (GEMM+GELU+positive/moments)", t, flops, io)
        if best is None or t < best[0]:
            best = (t, tiles)
    if best is None:
        raise SystemExit("no ffn_up_stats tile shape ran on this card")

    def plain():
        return ffn_up_stats(x, w, b, "gelu", batch.perm, batch.sorted_local, U, shift, stats=False, tiles=best[1])

    add("ffn_up_stats, best tiles, without the epilogue statistics", timed(plain, device), flops, io)

    def fp32_out():
        return ffn_up_stats(
            x, w, b, "gelu", batch.perm, batch.sorted_local, U, shift, tiles=best[1], out_dtype=torch.float32
        )

    t_fused32 = timed(lambda: fp32_out()[0].to(dtype), device)
    add(
        "ffn_up_stats, best tiles, fp32 output rounded for W2 (precision fp32, fused)", t_fused32, flops, io + M * N * 6
    )
    ffn = ffn_of(w, b)
    t_rows32 = timed(lambda: fp32_activations(ffn, x.index_select(0, batch.index)), device)
    add(
        f"fp32 recomputation of the {n_tok} token rows (precision fp32, torch/triton backends)",
        t_rows32,
        2 * n_tok * N * K,
        n_tok * (K + 4 * N) * x.element_size(),
    )
    # correctness on the card: the fused y is close to the model's; the kernels' counts equal the torch counts on y
    yf, _ = ffn_up_stats(x, w, b, "gelu", batch.perm, batch.sorted_local, U, shift, tiles=best[1])
    err = ((yf.float() - y.float()).norm() / y.float().norm()).item()
    ref = torch_sums(y.index_select(0, batch.index), batch.local, U, k, shift)
    same = all(torch.equal(sums[n].long(), ref[n].round().long()) for n in ("topk", "positive"))
    s1_err = ((sums["s1"] - ref["s1"]).norm() / ref["s1"].norm()).item()
    notes = [
        f"- fused y vs cuBLAS+GELU y: relative error {err:.2e}; label_stats counts == torch counts: {same}; "
        f"s1 relative difference {s1_err:.1e}; fold_sums == torch fold: {fold_same}",
        f"- label_stats with all statistics: {t_ts / t_read:.2f}x one read of the token rows "
        f"(target <= 2x); fp32 precision costs {t_rows32 * 1e6:,.0f} µs per layer unfused (token rows "
        f"recomputed) or {(t_fused32 - best[0]) * 1e6:,.0f} µs more than the bf16 fused kernel",
        f"- per layer for this batch: model path {t_act * 1e6:,.0f} µs; + label_stats {t_ts * 1e6:,.0f} µs "
        f"+ fold {t_fold * 1e6:,.0f} µs = {100 * (t_ts + t_fold) / t_act:.1f}% of it; torch statistics "
        f"{t_torch * 1e6:,.0f} µs + torch fold {t_fold_torch * 1e6:,.0f} µs; best fused {best[0] * 1e6:,.0f} µs",
    ]
    if not (same and fold_same):
        raise SystemExit("the kernels' counts or folded totals differ from the torch ones on the same activations")
    return rows, notes, best[1], best_all


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


def precision_study(model, dtype, feature_ext, batches, k, num_labels, device, backend) -> list[str]:
    """Top-k memberships in a ``dtype`` run: the model-precision and fp32-precision statistics against
    act(x W1ᵀ + b1) in float64 on the FFN inputs x the ``dtype`` model feeds its layers, and whole runs
    against an fp32 forward of the same (rounded) weights."""
    half = ModelAdapter(copy.deepcopy(model).to(device, dtype), feature_ext, "half")
    full = ModelAdapter(copy.deepcopy(model).to(device, dtype).float(), feature_ext, "fp32 twin")
    D = half.width
    inputs = {}
    first = batches[0][1].to(device)

    def capture(layer, ffn, h):
        inputs[layer] = h.reshape(-1, h.shape[-1]).index_select(0, first.index)
        return ffn.act(ffn.up(h))

    with torch.no_grad(), half.instrument(capture):
        half.encode(batches[0][0])
    masks = {"model": [], "fp32": [], "exact": []}
    tied = []
    with torch.no_grad():
        for layer, x in sorted(inputs.items()):
            ffn = half.ffns[layer]
            w, b = ffn.up.weight.double(), ffn.up.bias.double()
            model_a = ffn.act(ffn.up(x))
            masks["exact"].append(topk_mask_reference(ffn.act(x.double() @ w.T + b), k).cpu().numpy())
            masks["model"].append(topk_mask_reference(model_a, k).cpu().numpy())
            masks["fp32"].append(topk_mask_reference(fp32_activations(ffn, x), k).cpu().numpy())
            kth = model_a.abs().float().sort(dim=1, descending=True).values[:, k - 1 : k]
            tied.append(((model_a.abs().float() == kth).sum(1) > 1).float().mean().item())
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
    counts = {}
    for label, adapter, precision in (
        ("fp32", full, "model"),
        ("half-fp32", half, "fp32"),
        ("half-model", half, "model"),
    ):
        acc = Accumulator(
            adapter.num_layers, num_labels, D, k, ("topk",), device, backend, str(adapter.config.hidden_act), precision
        )
        current = {}
        with torch.no_grad(), adapter.instrument(lambda i, f, h: acc.ffn_activation(i, f, h, current["b"])):
            for waves, batch, _ in batches:
                current["b"] = batch.to(device)
                adapter.encode(waves)
        counts[label] = acc.compute()["topk_count"]
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
    return lines


STAT_KERNELS = (
    "_chunk_stats_kernel",
    "_topk_kernel",
    "_sums_kernel",
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

    def one_pass(backend):
        if backend is None:
            for waves, _, _ in batches:
                adapter.encode(waves)
            return None
        backend, _, precision = backend.partition("@")
        name = backend.removesuffix("+overlap")
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
        )
        if name == "compile":
            acc.backend = CompiledTorchBackend(acc.table, acc.params, act)
        current = {}
        # the design option "+overlap": each layer's statistics queued on a side stream, so that they run
        # beside the next layers instead of between them (the activation's and the batch's memory is kept
        # for the side stream with record_stream)
        side = torch.cuda.Stream() if backend.endswith("+overlap") else None

        def activation(layer, ffn, h):
            if side is None:
                return acc.ffn_activation(layer, ffn, h, current["b"])
            a = ffn.act(ffn.up(h))
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                acc.update(layer, a.reshape(-1, D), current["b"])
            a.record_stream(side)
            return a

        with adapter.instrument(activation):
            for waves, batch, _ in batches:
                current["b"] = batch.to(device)
                adapter.encode(waves)
                if side is not None:
                    for t in vars(current["b"]).values():
                        t.record_stream(side)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU interpreter check of the script)")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--per-batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--kernels-only", action="store_true", help="only the kernel-level tables")
    ap.add_argument(
        "--engine-only", action="store_true", help="only the engine runs, with the kernels' default tunings"
    )
    ap.add_argument("--results", default=str(RESULTS), help="append the tables here ('' for none)")
    ap.add_argument("--out", default=None, help="also write the tables here")
    args = ap.parse_args()
    if args.smoke:
        args.results = ""
        TIMING.update(repeat=1, warmup=0)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    rng = np.random.default_rng(0)
    size = "tiny" if args.smoke else "base"
    model = build_model("hubert", size, **({"num_hidden_layers": 2, "intermediate_size": 40} if args.smoke else {}))
    adapter = ModelAdapter(model.to(device, dtype), feature_extractor(), f"random HuBERT-{size}")
    D, H = adapter.width, adapter.config.hidden_size
    k = max(1, round(0.01 * D))
    num_labels = 41 * 2 * 4
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter smoke run)"

    lines = [
        "",
        f"### kernel_bench on {card}",
        "",
        f"- torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"CUDA {torch.version.cuda}; {dtype}".replace("torch.", ""),
    ]

    M = 16 * 750 if not args.smoke else 70
    configs = (
        [
            {"block": (64, 128, 64), "num_warps": 4, "num_stages": 4, "group_m": 8},
            {"block": (128, 128, 64), "num_warps": 8, "num_stages": 3, "group_m": 8},
            {"block": (64, 64, 64), "num_warps": 4, "num_stages": 4, "group_m": 8},
            {"block": (128, 256, 64), "num_warps": 8, "num_stages": 3, "group_m": 8},
            {"block": (128, 128, 64), "num_warps": 4, "num_stages": 4, "group_m": 8},
        ]
        if not args.smoke
        else [dict(fused.INTERPRETER_TILES)]
    )
    split_keys = ("search_rows", "search_warps", "search_bits")
    sums_keys = ("block_n", "rows", "num_warps", "two_pass")

    def chunk(digit, warps, two_pass=False):
        return {"design": "chunk", "digit": digit, "chunk_warps": warps, "two_pass": two_pass}

    def split_topk(*t):
        return {"design": "split", **dict(zip(split_keys, t))}

    def split_sums(*t):
        return {"design": "split", **dict(zip(sums_keys, t))}

    tunings = (
        {
            "topk": [chunk(d, w) for d in (8, 6, 11) for w in (4, 8, 16)]
            + [split_topk(*t) for t in ((1, 4, 1), (1, 4, 2), (1, 8, 2), (2, 4, 2), (4, 8, 2))],
            "sums": [
                split_sums(*t)
                for t in (
                    (256, 8, 4, False),
                    (256, 8, 4, True),
                    (512, 8, 8, False),
                    (256, 16, 4, False),
                    (1024, 4, 8, False),
                    (128, 16, 4, True),
                )
            ],
            "all": [chunk(d, w) for d in (8, 11) for w in (4, 8, 16)] + [chunk(8, 8, True)],
        }
        if not args.smoke
        else {
            "topk": [chunk(8, 4), chunk(5, 4), split_topk(1, 4, 1), split_topk(2, 4, 2)],
            "sums": [split_sums(16, 4, 4, False), split_sums(16, 2, 4, True)],
            "all": [chunk(8, 4), chunk(8, 4, True)],
        }
    )
    chosen = {}
    tables = ((0.2, "phone-mid-like, 20% token rows"), (1.0, "all rows are tokens"))
    for frac, name in () if args.engine_only else tables[1:] if args.smoke else tables:
        rows, notes, tiles, tuning = kernel_table(device, dtype, M, H, D, k, num_labels, frac, rng, configs, tunings)
        chosen[frac] = (tiles, tuning)
        lines += [
            "",
            f"Kernel level, M = {M} rows, K = {H}, N = {D}, k = {k}, {name}:",
            "",
            "| kernel | µs | TFLOP/s | GB/s | of HBM |",
            "| --- | ---: | ---: | ---: | ---: |",
            *rows,
            "",
            *notes,
        ]
    tiles, tuning = chosen.get(1.0, (fused.TILES, label_stats_module.TUNING))
    fused.TILES.update(tiles)
    label_stats_module.TUNING.update(tuning)
    how = "best with all rows as tokens" if chosen else "the defaults"
    lines += ["", f"- tunings for the engine runs ({how}): ffn_up_stats {tiles}; label_stats {tuning}"]
    study_dtype = torch.float16 if args.smoke else torch.bfloat16
    study = make_batches(adapter, 2, 2 if args.smoke else 8, 0.5 if args.smoke else 15.0, "all", rng)
    backend = "triton" if device == "cuda" else "torch"
    lines += precision_study(model, study_dtype, adapter.feature_extractor, study, k, num_labels, device, backend)
    emit("\n".join(lines) + "\n", args.results, args.out)
    if args.kernels_only:
        return

    seconds = args.seconds if not args.smoke else 0.5
    for mode in ("phone-mid", "all") if not args.smoke else ("all",):
        batches = make_batches(
            adapter,
            args.batches if not args.smoke else 1,
            args.per_batch if not args.smoke else 2,
            seconds,
            mode,
            rng,
        )
        frames = sum(b[2] for b in batches)
        tokens = sum(b[1].num_tokens for b in batches)
        variants = [("plain forward", None), ("collect, torch backend", "torch")]
        if not args.no_compile and not args.smoke:
            variants.append(("collect, torch.compile of the torch statistics", "compile"))
        variants.append(("collect, triton backend", "triton"))
        variants.append(("collect, triton backend, --stats-precision model", "triton@model"))
        if device == "cuda":
            variants.append(
                ("collect, triton backend, statistics on a side stream (model precision)", "triton+overlap@model")
            )
        variants.append(("collect, triton-fused backend", "triton-fused"))
        variants.append(("collect, triton-fused backend, --stats-precision model", "triton-fused@model"))
        profiled = "collect, triton backend"
        times, states, notes = engine_runs(
            adapter, batches, k, num_labels, variants, device, args.repeat if not args.smoke else 1, profiled
        )
        lines = []
        ref = states["collect, torch backend"].compute()
        check = []
        for name in (n for n in times if n.startswith("collect, triton")):
            got = states[name].compute()
            diff = int(np.abs(got["topk_count"] - ref["topk_count"]).sum())
            pos = int(np.abs(got["positive_count"] - ref["positive_count"]).sum())
            seen = ref["frames"] > 0
            err = {
                v: float(np.abs(got[v] - ref[v])[:, seen].max() / np.abs(ref[v])[:, seen].max())
                for v in ("mean", "var")
            }
            check.append(
                f"{name.removeprefix('collect, ')}: top-k counts differing from torch: {diff} of "
                f"{int(ref['topk_count'].sum())}, positive counts: {pos}; mean, var max difference / max value: "
                f"{err['mean']:.1e}, {err['var']:.1e}"
            )
        base = times["plain forward"]
        lines += [
            "",
            f"Engine level, tokens {mode}: {len(batches)} batches x {len(batches[0][0])} utterances of "
            f"~{seconds:g} s, {frames} frames, {tokens} tokens, all statistics",
            "",
            "| run | seconds | frames/s | vs plain |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [f"| {name} | {t:.4f} | {frames / t:,.0f} | {t / base:.3f} |" for name, t in times.items()]
        lines += ["", "- " + "; ".join(check), *notes]
        emit("\n".join(lines) + "\n", args.results, args.out)


if __name__ == "__main__":
    main()
