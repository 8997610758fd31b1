"""``topk_stats``: per-label statistics of selected token rows of the FFN activations, in one read.

For the paper's statistic every token needs the k-th largest |a| across its whole row (all D
neurons), which no GEMM tile sees, so this kernel reads each selected row of ``y = act(W1 x + b1)``
once and, in the same pass, also counts a > 0 and sums the shifted moments.

Two kernels.  The *threshold* kernel finds, for every token row, the k-th largest |a|: |a| is read as
an fp32 bit pattern (monotone for non-negative floats) and the key is built by a bitwise binary
search from the top bit down (only the bits the input dtype can set: 15 for bf16, 18 for fp16, 31 for
fp32), one bit per block reduction or (``search_bits`` 2) two, with three candidate counts packed
into one int64 reduction.  It runs one small program per few rows, so the searches' reductions overlap across the GPU.
The *accumulate* kernel walks *chunks* — runs of at most 32 token rows that share one label (the host
sorts the tokens by label while building the batch) — keeps the per-neuron sums in registers and
adds them to the per-batch buffers once, so atomics scale with the number of chunks, not of tokens.
Ties at the threshold go to the lower neuron index, through a prefix count of the tied lanes — the
same rule as the torch reference.

Counts are int32 atomics (exact and order-independent); moment sums are fp32 atomics, so their
rounding may differ from run to run.  With ``TUNING["two_pass"]`` each chunk stores its sums in its own
row and a second kernel adds each label's chunk rows in order: no atomics, and the moment sums are
deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOW_BIT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


@triton.jit
def _threshold_kernel(
    y_ptr,
    stride_y,
    rows_ptr,
    n_rows,
    thr_ptr,
    room_ptr,
    D,
    k,
    LOW_BIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    TWO_BITS: tl.constexpr,
):
    """Per token row: the k-th largest |a| as a key, and how many keys equal to it the top k takes.

    The key is the largest ``thr`` with at least k keys >= thr, built bit by bit from the top.  With
    ``TWO_BITS`` each step settles two bits: the counts of its three candidates are packed into one
    int64 (21 bits each) so that one block reduction serves them all — half the dependent reductions.
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = r < n_rows
    offs = tl.arange(0, BLOCK_D)
    ok = live[:, None] & (offs < D)[None, :]
    row = tl.load(rows_ptr + r, mask=live, other=0).to(tl.int64)
    a = tl.load(y_ptr + row[:, None] * stride_y + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    key = tl.where(ok, tl.abs(a).to(tl.int32, bitcast=True), -1)
    thr = tl.zeros([ROWS], dtype=tl.int32)
    if TWO_BITS:
        if (31 - LOW_BIT) % 2 == 1:
            cand = thr | (1 << 30)
            thr = tl.where(tl.sum((key >= cand[:, None]).to(tl.int32), axis=1) >= k, cand, thr)
        for step in tl.static_range((31 - LOW_BIT) // 2):
            high = 30 - (31 - LOW_BIT) % 2 - 2 * step
            c1 = thr | (1 << (high - 1))
            c2 = thr | (1 << high)
            c3 = c2 | (1 << (high - 1))
            packed = (
                (key >= c1[:, None]).to(tl.int64)
                + ((key >= c2[:, None]).to(tl.int64) << 21)
                + ((key >= c3[:, None]).to(tl.int64) << 42)
            )
            total = tl.sum(packed, axis=1)
            n1 = (total & 0x1FFFFF).to(tl.int32)
            n2 = ((total >> 21) & 0x1FFFFF).to(tl.int32)
            n3 = (total >> 42).to(tl.int32)
            thr = tl.where(n3 >= k, c3, tl.where(n2 >= k, c2, tl.where(n1 >= k, c1, thr)))
    else:
        for b in tl.static_range(31 - LOW_BIT):
            cand = thr | (1 << (30 - b))
            above = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            thr = tl.where(above >= k, cand, thr)
    room = k - tl.sum((key > thr[:, None]).to(tl.int32), axis=1)
    tl.store(thr_ptr + r, thr, mask=live)
    tl.store(room_ptr + r, room, mask=live)


@triton.jit
def _accumulate_kernel(
    y_ptr,
    stride_y,
    rows_ptr,
    chunk_start_ptr,
    chunk_label_ptr,
    thr_ptr,
    room_ptr,
    shift_ptr,
    topk_ptr,
    pos_ptr,
    s1_ptr,
    s2_ptr,
    D,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    DO_TOPK: tl.constexpr,
    DO_POS: tl.constexpr,
    DO_MOM: tl.constexpr,
    TWO_PASS: tl.constexpr,
):
    """Per same-label chunk: sums of the top-k masks, positive masks and shifted moments of its rows,
    added to the label's row of the outputs (atomics), or (``TWO_PASS``) stored in the chunk's row."""
    chunk = tl.program_id(0)
    start = tl.load(chunk_start_ptr + chunk)
    end = tl.load(chunk_start_ptr + chunk + 1)
    label = tl.load(chunk_label_ptr + chunk).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    valid = offs < D
    if DO_MOM:
        shift = tl.load(shift_ptr + offs, mask=valid, other=0.0)
    acc_topk = tl.zeros([BLOCK_D], dtype=tl.int32)
    acc_pos = tl.zeros([BLOCK_D], dtype=tl.int32)
    acc_s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_s2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(start, end, ROWS):
        r = i + tl.arange(0, ROWS)
        live = r < end
        row = tl.load(rows_ptr + r, mask=live, other=0).to(tl.int64)
        ok = live[:, None] & valid[None, :]
        a = tl.load(y_ptr + row[:, None] * stride_y + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        if DO_TOPK:
            thr = tl.load(thr_ptr + r, mask=live, other=0)
            room = tl.load(room_ptr + r, mask=live, other=0)
            key = tl.where(ok, tl.abs(a).to(tl.int32, bitcast=True), -1)
            tied = (key == thr[:, None]).to(tl.int32)
            take = (tied == 1) & (tl.cumsum(tied, axis=1) <= room[:, None])
            acc_topk += tl.sum(((key > thr[:, None]) | take).to(tl.int32), axis=0)
        if DO_POS:
            acc_pos += tl.sum(((a > 0) & ok).to(tl.int32), axis=0)
        if DO_MOM:
            dev = tl.where(ok, a - shift[None, :], 0.0)
            acc_s1 += tl.sum(dev, axis=0)
            acc_s2 += tl.sum(dev * dev, axis=0)
    if TWO_PASS:
        out = chunk.to(tl.int64) * D + offs
        if DO_TOPK:
            tl.store(topk_ptr + out, acc_topk, mask=valid)
        if DO_POS:
            tl.store(pos_ptr + out, acc_pos, mask=valid)
        if DO_MOM:
            tl.store(s1_ptr + out, acc_s1, mask=valid)
            tl.store(s2_ptr + out, acc_s2, mask=valid)
    else:
        out = label * D + offs
        if DO_TOPK:
            tl.atomic_add(topk_ptr + out, acc_topk, mask=valid & (acc_topk != 0))
        if DO_POS:
            tl.atomic_add(pos_ptr + out, acc_pos, mask=valid & (acc_pos != 0))
        if DO_MOM:
            tl.atomic_add(s1_ptr + out, acc_s1, mask=valid)
            tl.atomic_add(s2_ptr + out, acc_s2, mask=valid)


@triton.jit
def _chunk_reduce_kernel(part_ptr, out_ptr, label_chunks_ptr, D, BLOCK: tl.constexpr):
    """Per label and column block: the sum of its chunks' rows of ``part`` (chunks are sorted by label)."""
    label = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < D
    first = tl.load(label_chunks_ptr + label)
    last = tl.load(label_chunks_ptr + label + 1)
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    row_ptr = part_ptr + first.to(tl.int64) * D + offs
    for _ in range(first, last):
        acc += tl.load(row_ptr, mask=valid, other=0)
        row_ptr += D
    tl.store(out_ptr + label.to(tl.int64) * D + offs, acc, mask=valid)


TUNING = {"search_rows": 1, "search_warps": 4, "search_bits": 1, "rows": 2, "num_warps": 8, "two_pass": False}
"""Rows per program step, warps and bits settled per search step of the two kernels on CUDA, and whether
chunks store their sums for a second reduction kernel instead of adding them with atomics
(bench/kernel_bench.py measures choices)."""


def topk_thresholds(y: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token row ``y[rows[i]]``: the k-th largest |a| as an fp32 bit-pattern key (int32) and ``room``,
    how many keys equal to it the top k takes (k minus the number of larger keys)."""
    _check(y, k)
    n_rows = rows.numel()
    thr = torch.empty(n_rows, dtype=torch.int32, device=y.device)
    room = torch.empty(n_rows, dtype=torch.int32, device=y.device)
    if n_rows:
        search_rows = TUNING["search_rows"]
        _threshold_kernel[(triton.cdiv(n_rows, search_rows),)](
            y,
            y.stride(0),
            rows,
            n_rows,
            thr,
            room,
            y.shape[1],
            k,
            LOW_BIT=_LOW_BIT[y.dtype],
            BLOCK_D=triton.next_power_of_2(y.shape[1]),
            ROWS=search_rows,
            TWO_BITS=TUNING["search_bits"] == 2,
            num_warps=TUNING["search_warps"] if y.is_cuda else 4,
        )
    return thr, room


def _check(y: torch.Tensor, k: int) -> None:
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError("y must be a row-major [M, D] matrix")
    if y.dtype not in _LOW_BIT:
        raise ValueError(f"unsupported dtype {y.dtype}; use bf16, fp16 or fp32")
    if not 1 <= k <= y.shape[1]:
        raise ValueError(f"need 1 <= k <= D, got k={k}, D={y.shape[1]}")
    if y.shape[1] >= 2**21:
        raise ValueError(f"D = {y.shape[1]} is too wide: the threshold search packs counts in 21 bits")


def topk_stats(
    y: torch.Tensor,
    rows: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_labels: torch.Tensor,
    num_labels: int,
    k: int,
    shift: torch.Tensor | None = None,
    topk: bool = True,
    positive: bool = True,
    moments: bool = True,
    thresholds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-label sums over the token rows ``y[rows]`` (rows grouped into same-label chunks).

    Returns int32 ``topk`` and ``positive`` counts and fp32 ``s1`` = Σ(a − shift), ``s2`` = Σ(a − shift)²,
    each [num_labels, D], for the statistics asked for.  ``thresholds`` (from :func:`topk_thresholds` on
    the same rows) skips the search.
    """
    _check(y, k)
    width = y.shape[1]
    dev = y.device
    if moments and shift is None:
        raise ValueError("moments need the per-neuron shift")
    n_chunks = chunk_labels.numel()
    two_pass = bool(TUNING["two_pass"]) and n_chunks > 0
    rows_out = n_chunks if two_pass else num_labels
    alloc = torch.empty if two_pass else torch.zeros
    ints = lambda: alloc((rows_out, width), dtype=torch.int32, device=dev)  # noqa: E731
    floats = lambda: alloc((rows_out, width), dtype=torch.float32, device=dev)  # noqa: E731
    out_topk, out_pos = (ints() if topk else None), (ints() if positive else None)
    s1, s2 = (floats(), floats()) if moments else (None, None)
    dummy = torch.empty(1, dtype=torch.int32, device=dev)
    if n_chunks:
        thr = room = dummy
        if topk:
            thr, room = thresholds if thresholds is not None else topk_thresholds(y, rows, k)
        _accumulate_kernel[(n_chunks,)](
            y,
            y.stride(0),
            rows,
            chunk_starts,
            chunk_labels,
            thr,
            room,
            shift.float().contiguous() if moments else dummy,
            out_topk if topk else dummy,
            out_pos if positive else dummy,
            s1 if moments else dummy,
            s2 if moments else dummy,
            width,
            BLOCK_D=triton.next_power_of_2(width),
            ROWS=TUNING["rows"],
            DO_TOPK=topk,
            DO_POS=positive,
            DO_MOM=moments,
            TWO_PASS=two_pass,
            num_warps=TUNING["num_warps"] if y.is_cuda else 4,
        )
    out = {name: t for name, t in (("topk", out_topk), ("positive", out_pos), ("s1", s1), ("s2", s2)) if t is not None}
    if two_pass:
        label_chunks = torch.searchsorted(chunk_labels, torch.arange(num_labels + 1, device=dev, dtype=torch.int32))
        label_chunks = label_chunks.to(torch.int32)
        block = min(1024, triton.next_power_of_2(width))
        for name, part in out.items():
            out[name] = torch.empty((num_labels, width), dtype=part.dtype, device=dev)
            _chunk_reduce_kernel[(num_labels, triton.cdiv(width, block))](
                part, out[name], label_chunks, width, BLOCK=block
            )
    return out


def topk_stats_reference(
    y: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor, num_labels: int, k: int, shift: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Pure-torch float64 reference: the same sums from the token rows and their labels (any order)."""
    a = y.index_select(0, rows.long()).double()
    labels = labels.long()
    absx = a.abs()
    order = torch.sort(absx, dim=1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(absx, dtype=torch.bool).scatter_(1, order, True)
    z = lambda: torch.zeros((num_labels, a.shape[1]), dtype=torch.float64, device=a.device)  # noqa: E731
    dev = a - shift.double()
    return {
        "topk": z().index_add_(0, labels, mask.double()).long(),
        "positive": z().index_add_(0, labels, (a > 0).double()).long(),
        "s1": z().index_add_(0, labels, dev),
        "s2": z().index_add_(0, labels, dev * dev),
    }
