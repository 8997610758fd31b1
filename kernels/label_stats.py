"""``label_stats``: per-label statistics of selected token rows of the FFN activations — top-k counts,
positive counts and shifted moment sums (any subset).

For the paper's statistic every token needs the k-th largest |a| across its whole row (all D
neurons), which no GEMM tile sees, so the kernels read whole rows of ``y = act(W1 x + b1)``.  The key
of a lane is |a| read as an fp32 bit pattern (monotone for non-negative floats); only the bits the
input dtype can set matter (15 for bf16, 18 for fp16, 31 for fp32).  Ties at the threshold go to the
lower neuron index (a prefix count of the tied lanes, only in rows with more tied lanes than room) —
the same rule as the torch reference.  Two designs (:data:`DESIGNS`; the engine times both on a card and
takes the faster, :func:`time_designs`):

- ``split`` (two reads of the rows; it beat the first one-kernel design, a radix select per same-label
  chunk one row at a time, on an H200: 516 vs 868 µs for all statistics of 12,000 × 3,072 bf16 rows):

  - ``_topk_kernel``: per token row, the threshold by a bitwise binary search from the top bit down (one
    whole-row reduction per bit), then one int32 atomic per top-k lane into the row's label.
  - ``_sums_kernel``: per (same-label chunk, column block), positive counts and shifted moment sums of the
    chunk's rows (the host sorts the tokens by label and cuts them into chunks), flushed once per chunk.

- ``one-read`` (``_one_read_kernel``, each row read once): a program takes a block of consecutive
  label-sorted token rows and walks it in tiles of a few whole rows held in registers.  Each tile finds
  its rows' thresholds together (a radix select: one per-row histogram per digit of the key's bits, or
  with 1-bit digits the bitwise search), then the tile's rows are summed per label run (the top-k lanes,
  a > 0, a − shift and its square); a run that goes on into the next tile is carried in registers, and
  each run is flushed once per program (counts only where non-zero): no atomic per lane.

Counts are int32 atomics (exact and order-independent); moment sums are fp32 atomics, so their
rounding may differ from run to run (``one-read``: only for labels whose run spans programs).  With
``TUNING["two_pass"]`` the split design's chunks store their sums in their own rows and a second kernel
adds each label's chunk rows in order: no float atomics, and the moment sums are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOW_BIT = {torch.bfloat16: 16, torch.float16: 13, torch.float32: 0}


@triton.jit
def _topk_kernel(
    y_ptr,
    stride_y,
    rows_ptr,
    row_labels_ptr,
    n_rows,
    out_ptr,
    D,
    k,
    LOW_BIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Per token row: the top-k lanes of |a| (ties to the lower index), added to ``out[label]``.

    The threshold is the largest key ``thr`` with at least k keys >= thr, built bit by bit from the top.
    """
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = r < n_rows
    offs = tl.arange(0, BLOCK_D)
    ok = live[:, None] & (offs < D)[None, :]
    row = tl.load(rows_ptr + r, mask=live, other=0).to(tl.int64)
    a = tl.load(y_ptr + row[:, None] * stride_y + offs[None, :], mask=ok, other=0.0).to(tl.float32)
    key = tl.where(ok, tl.abs(a).to(tl.int32, bitcast=True), -1)
    thr = tl.zeros([ROWS], dtype=tl.int32)
    for b in tl.static_range(31 - LOW_BIT):
        cand = thr | (1 << (30 - b))
        count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(count >= k, cand, thr)
    above = key > thr[:, None]
    tied = (key == thr[:, None]).to(tl.int32)
    room = k - tl.sum(above.to(tl.int32), axis=1)
    take = above | (tied == 1)
    if tl.max(tl.sum(tied, axis=1) - room, axis=0) > 0:
        take = above | ((tied == 1) & (tl.cumsum(tied, axis=1) <= room[:, None]))
    label = tl.load(row_labels_ptr + r, mask=live, other=0).to(tl.int64)
    tl.atomic_add(out_ptr + label[:, None] * D + offs[None, :], 1, mask=take & ok)


@triton.jit
def _sums_kernel(
    y_ptr,
    stride_y,
    rows_ptr,
    chunk_start_ptr,
    chunk_label_ptr,
    shift_ptr,
    pos_ptr,
    s1_ptr,
    s2_ptr,
    D,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    DO_POS: tl.constexpr,
    DO_MOM: tl.constexpr,
    TWO_PASS: tl.constexpr,
):
    """Per (same-label chunk, column block): positive counts and shifted moment sums of its rows, added
    to the label's row of the outputs (atomics), or (``TWO_PASS``) stored in the chunk's row."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = cols < D
    start = tl.load(chunk_start_ptr + chunk)
    end = tl.load(chunk_start_ptr + chunk + 1)
    if DO_MOM:
        shift = tl.load(shift_ptr + cols, mask=valid, other=0.0)
    acc_pos = tl.zeros([ROWS, BLOCK_N], dtype=tl.int32)
    acc_s1 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    acc_s2 = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
    for i in range(start, end, ROWS):
        r = i + tl.arange(0, ROWS)
        live = r < end
        row = tl.load(rows_ptr + r, mask=live, other=0).to(tl.int64)
        ok = live[:, None] & valid[None, :]
        a = tl.load(y_ptr + row[:, None] * stride_y + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if DO_POS:
            acc_pos += (a > 0).to(tl.int32)
        if DO_MOM:
            dev = tl.where(ok, a - shift[None, :], 0.0)
            acc_s1 += dev
            acc_s2 += dev * dev
    if TWO_PASS:
        out = chunk.to(tl.int64) * D + cols
    else:
        out = tl.load(chunk_label_ptr + chunk).to(tl.int64) * D + cols
    if DO_POS:
        pos = tl.sum(acc_pos, axis=0)
        if TWO_PASS:
            tl.store(pos_ptr + out, pos, mask=valid)
        else:
            tl.atomic_add(pos_ptr + out, pos, mask=valid & (pos != 0))
    if DO_MOM:
        s1 = tl.sum(acc_s1, axis=0)
        s2 = tl.sum(acc_s2, axis=0)
        if TWO_PASS:
            tl.store(s1_ptr + out, s1, mask=valid)
            tl.store(s2_ptr + out, s2, mask=valid)
        else:
            tl.atomic_add(s1_ptr + out, s1, mask=valid)
            tl.atomic_add(s2_ptr + out, s2, mask=valid)


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



@triton.jit
def _digit_step(key, prefix, need, HI: tl.constexpr, LO: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """One digit (key bits [LO, HI)) of the radix select of ``ROWS`` rows at once: among each row's keys
    that equal its ``prefix`` above HI, the digit of the ``need``-th largest and how many keys of the row
    are still needed below it.  The rows' histograms are one histogram of (row, digit) bins."""
    NB: tl.constexpr = 1 << (HI - LO)
    match = (key >> HI) == (prefix >> HI)[:, None]
    digit = (key >> LO) & (NB - 1)
    bins = tl.arange(0, ROWS)[:, None] * NB + digit
    hist = tl.histogram(tl.reshape(bins, [ROWS * BLOCK_D]), ROWS * NB, mask=tl.reshape(match, [ROWS * BLOCK_D]))
    hist = tl.reshape(hist, [ROWS, NB])
    at_least = tl.cumsum(hist, axis=1, reverse=True)
    chosen = tl.sum((at_least >= need[:, None]).to(tl.int32), axis=1) - 1
    need -= tl.sum(tl.where(tl.arange(0, NB)[None, :] > chosen[:, None], hist, 0), axis=1)
    return prefix | (chosen << LO), need


@triton.jit
def _top_lanes(key, ok, k, LOW_BIT: tl.constexpr, DIGIT: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """[ROWS, BLOCK_D] int32: 1 at each row's k largest keys, ties at the k-th to the lower index.

    The threshold is the largest key ``thr`` with at least k keys >= thr: with ``DIGIT`` = 1 built bit by
    bit from the top (one whole-row count per bit), else digit by digit (one histogram per digit, the top
    digit taking what is left of the 31 − LOW_BIT bits)."""
    thr = tl.zeros([ROWS], dtype=tl.int32)
    if DIGIT == 1:
        for b in tl.static_range(31 - LOW_BIT):
            cand = thr | (1 << (30 - b))
            count = tl.sum((key >= cand[:, None]).to(tl.int32), axis=1)
            thr = tl.where(count >= k, cand, thr)
        room = k - tl.sum((key > thr[:, None]).to(tl.int32), axis=1)
    else:
        PASSES: tl.constexpr = (31 - LOW_BIT + DIGIT - 1) // DIGIT
        FIRST: tl.constexpr = 31 - LOW_BIT - (PASSES - 1) * DIGIT
        room = tl.zeros([ROWS], dtype=tl.int32) + k
        thr, room = _digit_step(key, thr, room, 31, 31 - FIRST, ROWS, BLOCK_D)
        for p in tl.static_range(PASSES - 1):
            thr, room = _digit_step(key, thr, room, 31 - FIRST - p * DIGIT, 31 - FIRST - (p + 1) * DIGIT, ROWS, BLOCK_D)
    above = key > thr[:, None]
    tied = ((key == thr[:, None]) & ok).to(tl.int32)
    take = above | (tied == 1)
    if tl.max(tl.sum(tied, axis=1) - room, axis=0) > 0:
        take = above | ((tied == 1) & (tl.cumsum(tied, axis=1) <= room[:, None]))
    return (take & ok).to(tl.int32)


@triton.jit
def _one_read_kernel(
    y_ptr,
    stride_y,
    rows_ptr,
    labels_ptr,
    n_rows,
    shift_ptr,
    topk_ptr,
    pos_ptr,
    s1_ptr,
    s2_ptr,
    D,
    k,
    LOW_BIT: tl.constexpr,
    DIGIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    TILES: tl.constexpr,
    DO_TOPK: tl.constexpr,
    DO_POS: tl.constexpr,
    DO_MOM: tl.constexpr,
):
    """Per block of ``ROWS * TILES`` label-sorted token rows: each tile of ``ROWS`` whole rows read once,
    its top-k lanes, positive lanes and shifted moments summed per label run; a run that goes on past
    the tile is carried (``c_*``, label ``c_label``; −1: nothing carried), every run flushed once."""
    offs = tl.arange(0, BLOCK_D)
    valid = offs < D
    if DO_MOM:
        shift = tl.load(shift_ptr + offs, mask=valid, other=0.0)
    c_top = tl.zeros([BLOCK_D], dtype=tl.int32)
    c_pos = tl.zeros([BLOCK_D], dtype=tl.int32)
    c_s1 = tl.zeros([BLOCK_D], dtype=tl.float32)
    c_s2 = tl.zeros([BLOCK_D], dtype=tl.float32)
    c_label = tl.zeros([], dtype=tl.int32) - 1
    for t in range(TILES):
        t0 = (tl.program_id(0) * TILES + t) * ROWS
        r = t0 + tl.arange(0, ROWS)
        live = r < n_rows
        ok = live[:, None] & valid[None, :]
        row = tl.load(rows_ptr + r, mask=live, other=0).to(tl.int64)
        a = tl.load(y_ptr + row[:, None] * stride_y + offs[None, :], mask=ok, other=0.0).to(tl.float32)
        if DO_TOPK:
            key = tl.where(ok, tl.abs(a).to(tl.int32, bitcast=True), -1)
            take = _top_lanes(key, ok, k, LOW_BIT, DIGIT, ROWS, BLOCK_D)
        if DO_MOM:
            dev = tl.where(ok, a - shift[None, :], 0.0)
        lab = tl.load(labels_ptr + r, mask=live, other=-1)
        before = tl.load(labels_ptr + r - 1, mask=live & (r > t0), other=-1)
        starts = (live & (lab != before)).to(tl.int32)
        run = tl.where(live, tl.cumsum(starts, axis=0) - 1, -1)
        after = tl.load(labels_ptr + t0 + ROWS, mask=t0 + ROWS < n_rows, other=-1)  # the next tile's first label
        n_runs = tl.sum(starts, axis=0)
        for j in range(n_runs):
            sel = run == j
            label = tl.max(tl.where(sel, lab, -1), axis=0)
            carried = label == c_label  # only the tile's first run can continue the carried one
            ends = (j < n_runs - 1) | (label != after)  # else it goes on into the next tile
            out = label.to(tl.int64) * D + offs
            flush = tl.where(ends, valid, False)  # (a scalar & a vector is no bool mask in the interpreter)
            if DO_TOPK:
                s_top = tl.sum(tl.where(sel[:, None], take, 0), axis=0) + tl.where(carried, c_top, 0)
                tl.atomic_add(topk_ptr + out, s_top, mask=flush & (s_top != 0))
                c_top = tl.where(ends, 0, s_top)
            if DO_POS:
                s_pos = tl.sum(tl.where(sel[:, None], (a > 0).to(tl.int32), 0), axis=0) + tl.where(carried, c_pos, 0)
                tl.atomic_add(pos_ptr + out, s_pos, mask=flush & (s_pos != 0))
                c_pos = tl.where(ends, 0, s_pos)
            if DO_MOM:
                s_1 = tl.sum(tl.where(sel[:, None], dev, 0.0), axis=0) + tl.where(carried, c_s1, 0.0)
                s_2 = tl.sum(tl.where(sel[:, None], dev * dev, 0.0), axis=0) + tl.where(carried, c_s2, 0.0)
                tl.atomic_add(s1_ptr + out, s_1, mask=flush)
                tl.atomic_add(s2_ptr + out, s_2, mask=flush)
                c_s1 = tl.where(ends, 0.0, s_1)
                c_s2 = tl.where(ends, 0.0, s_2)
            c_label = tl.where(ends, -1, label)
    out = tl.maximum(c_label, 0).to(tl.int64) * D + offs
    flush = tl.where(c_label >= 0, valid, False)  # the run that goes on into the next program
    if DO_TOPK:
        tl.atomic_add(topk_ptr + out, c_top, mask=flush & (c_top != 0))
    if DO_POS:
        tl.atomic_add(pos_ptr + out, c_pos, mask=flush & (c_pos != 0))
    if DO_MOM:
        tl.atomic_add(s1_ptr + out, c_s1, mask=flush)
        tl.atomic_add(s2_ptr + out, c_s2, mask=flush)


DESIGNS = ("split", "one-read")
"""The two designs of :func:`label_stats` (the same sums; the engine takes the faster on a card)."""
DEFAULT_DESIGN = "split"
"""The design used where nothing was timed (a CPU, the interpreter): the one measured on a card so far."""

TUNING = {
    "search_rows": 1,
    "search_warps": 4,
    "block_n": 1024,
    "rows": 4,
    "num_warps": 8,
    "two_pass": False,
    "one_read_rows": 4,
    "one_read_tiles": 8,
    "one_read_digit": 4,
    "one_read_warps": 8,
}
"""``split``: the top-k kernel's rows per program and warps; the sums kernel's column block, rows per step
and warps; and whether chunks store their sums for a second reduction kernel instead of adding them with
atomics (the fastest measured on an H200).  ``one-read``: rows per tile (a power of two), tiles per
program, bits per radix digit (1: the bitwise search) and warps — first guesses, not yet timed on a card:
a GPU histogram costs each lane about (rows × 2^digit) / 32 bin updates, so small digits (a few passes of
cheap histograms) should beat 8-bit ones.  bench/kernel_bench.py sweeps them."""


def _check(y: torch.Tensor, k: int) -> None:
    if y.dim() != 2 or y.stride(1) != 1:
        raise ValueError("y must be a row-major [M, D] matrix")
    if y.dtype not in _LOW_BIT:
        raise ValueError(f"unsupported dtype {y.dtype}; use bf16, fp16 or fp32")
    if not 1 <= k <= y.shape[1]:
        raise ValueError(f"need 1 <= k <= D, got k={k}, D={y.shape[1]}")


def label_stats(
    y: torch.Tensor,
    rows: torch.Tensor,
    row_labels: torch.Tensor,
    chunk_starts: torch.Tensor,
    chunk_labels: torch.Tensor,
    num_labels: int,
    k: int,
    shift: torch.Tensor | None = None,
    topk: bool = True,
    positive: bool = True,
    moments: bool = True,
    design: str = DEFAULT_DESIGN,
) -> dict[str, torch.Tensor]:
    """Per-label sums over the token rows ``y[rows]`` (rows sorted by label ``row_labels`` and grouped
    into same-label chunks: :func:`neurostat.engine.batching.chunk_tokens`; ``one-read`` reads only the
    sorted rows and their labels), by either of :data:`DESIGNS`.

    Returns int32 ``topk`` and ``positive`` counts and fp32 ``s1`` = Σ(a − shift), ``s2`` = Σ(a − shift)²,
    each [num_labels, D], for the statistics asked for.
    """
    _check(y, k)
    if design not in DESIGNS:
        raise ValueError(f"unknown label_stats design {design!r}; choose from {DESIGNS}")
    width, dev = y.shape[1], y.device
    if moments and shift is None:
        raise ValueError("moments need the per-neuron shift")
    n_chunks = chunk_labels.numel()
    two_pass = design == "split" and bool(TUNING["two_pass"]) and n_chunks > 0
    rows_out = n_chunks if two_pass else num_labels
    alloc = torch.empty if two_pass else torch.zeros
    out = {}
    if topk:
        out["topk"] = torch.zeros((num_labels, width), dtype=torch.int32, device=dev)
    if positive:
        out["positive"] = alloc((rows_out, width), dtype=torch.int32, device=dev)
    if moments:
        out["s1"] = alloc((rows_out, width), dtype=torch.float32, device=dev)
        out["s2"] = alloc((rows_out, width), dtype=torch.float32, device=dev)
    if not rows.numel():
        return out
    if design == "one-read":
        _launch_one_read(y, rows, row_labels, k, shift, out)
        return out
    _launch(y, rows, row_labels, chunk_starts, chunk_labels, k, shift, out, two_pass)
    if two_pass:
        label_chunks = torch.searchsorted(chunk_labels, torch.arange(num_labels + 1, device=dev, dtype=torch.int32))
        label_chunks = label_chunks.to(torch.int32)
        block = min(1024, triton.next_power_of_2(width))
        for name in ("positive", "s1", "s2"):
            if name in out:
                part, out[name] = out[name], torch.empty((num_labels, width), dtype=out[name].dtype, device=dev)
                _chunk_reduce_kernel[(num_labels, triton.cdiv(width, block))](
                    part, out[name], label_chunks, width, BLOCK=block
                )
    return out


def _launch(y, rows, row_labels, chunk_starts, chunk_labels, k, shift, out, two_pass) -> None:
    """The top-k kernel over the token rows and the sums kernel over (chunk, column block) tiles."""
    width, cuda = y.shape[1], y.is_cuda
    if "topk" in out:
        search_rows = TUNING["search_rows"]
        _topk_kernel[(triton.cdiv(rows.numel(), search_rows),)](
            y,
            y.stride(0),
            rows,
            row_labels,
            rows.numel(),
            out["topk"],
            width,
            k,
            LOW_BIT=_LOW_BIT[y.dtype],
            BLOCK_D=triton.next_power_of_2(width),
            ROWS=search_rows,
            num_warps=TUNING["search_warps"] if cuda else 4,
        )
    if "positive" in out or "s1" in out:
        dummy = torch.empty(1, dtype=torch.int32, device=y.device)
        block_n = min(TUNING["block_n"], triton.next_power_of_2(width))
        _sums_kernel[(chunk_labels.numel(), triton.cdiv(width, block_n))](
            y,
            y.stride(0),
            rows,
            chunk_starts,
            chunk_labels,
            shift.float().contiguous() if "s1" in out else dummy,
            out.get("positive", dummy),
            out.get("s1", dummy),
            out.get("s2", dummy),
            width,
            BLOCK_N=block_n,
            ROWS=TUNING["rows"],
            DO_POS="positive" in out,
            DO_MOM="s1" in out,
            TWO_PASS=two_pass,
            num_warps=TUNING["num_warps"] if cuda else 4,
        )


def _launch_one_read(y, rows, row_labels, k, shift, out) -> None:
    """The one-read kernel over blocks of ``one_read_rows × one_read_tiles`` sorted token rows."""
    dummy = torch.empty(1, dtype=torch.int32, device=y.device)
    per_tile = TUNING["one_read_rows"]
    if per_tile < 1 or per_tile & (per_tile - 1):
        raise ValueError(f"TUNING['one_read_rows'] must be a power of two (rows of a tile), got {per_tile}")
    tiles = max(1, min(TUNING["one_read_tiles"], triton.cdiv(rows.numel(), per_tile)))
    _one_read_kernel[(triton.cdiv(rows.numel(), per_tile * tiles),)](
        y,
        y.stride(0),
        rows,
        row_labels,
        rows.numel(),
        shift.float().contiguous() if "s1" in out else dummy,
        out.get("topk", dummy),
        out.get("positive", dummy),
        out.get("s1", dummy),
        out.get("s2", dummy),
        y.shape[1],
        k,
        LOW_BIT=_LOW_BIT[y.dtype],
        DIGIT=TUNING["one_read_digit"],
        BLOCK_D=triton.next_power_of_2(y.shape[1]),
        ROWS=per_tile,
        TILES=tiles,
        DO_TOPK="topk" in out,
        DO_POS="positive" in out,
        DO_MOM="s1" in out,
        num_warps=TUNING["one_read_warps"] if y.is_cuda else 4,
    )
