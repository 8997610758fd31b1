"""``fold_sums``: one batch's per-label sums folded into a layer's running totals, in one launch.

The torch backend's merge (the ``sum`` and ``chan`` rules of :mod:`neurostat.engine.statistics`) takes
about fifteen whole-array ops per layer and batch — int64 copies of the counts, index_add,
index_select/index_copy of the float64 moments and the temporaries of Chan et al.'s formula — each a
pass over [labels in the batch, D] float64 arrays.  This kernel reads each batch sum and each total
once, does the same float64 arithmetic in registers and writes each total once.  Its reference:
:func:`neurostat.kernels.reference.fold_reference`.

One program per (label of the batch, column block); every label occurs once in a batch, so programs
own disjoint rows of the totals: no atomics, deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _fold_kernel(
    labels_ptr,
    counts_ptr,
    tokens_ptr,
    shift_ptr,
    topk_b_ptr,
    pos_b_ptr,
    s1_ptr,
    s2_ptr,
    topk_ptr,
    pos_ptr,
    mean_ptr,
    m2_ptr,
    D,
    BLOCK: tl.constexpr,
    DO_TOPK: tl.constexpr,
    DO_POS: tl.constexpr,
    DO_MOM: tl.constexpr,
):
    u = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < D
    label = tl.load(labels_ptr + u).to(tl.int64)
    src = u.to(tl.int64) * D + cols
    dst = label * D + cols
    if DO_TOPK:
        total = tl.load(topk_ptr + dst, mask=valid, other=0)
        tl.store(topk_ptr + dst, total + tl.load(topk_b_ptr + src, mask=valid, other=0).to(tl.int64), mask=valid)
    if DO_POS:
        total = tl.load(pos_ptr + dst, mask=valid, other=0)
        tl.store(pos_ptr + dst, total + tl.load(pos_b_ptr + src, mask=valid, other=0).to(tl.int64), mask=valid)
    if DO_MOM:
        n_b = tl.load(counts_ptr + u).to(tl.float64)
        n_a = tl.load(tokens_ptr + label).to(tl.float64)
        n = n_a + n_b
        offset = tl.load(s1_ptr + src, mask=valid, other=0.0).to(tl.float64) / n_b
        m2_b = tl.load(s2_ptr + src, mask=valid, other=0.0).to(tl.float64) - offset * (offset * n_b)
        mean = tl.load(mean_ptr + dst, mask=valid, other=0.0)
        delta = (offset + tl.load(shift_ptr + cols, mask=valid, other=0.0).to(tl.float64)) - mean
        tl.store(mean_ptr + dst, mean + delta * (n_b / n), mask=valid)
        m2 = tl.load(m2_ptr + dst, mask=valid, other=0.0)
        tl.store(m2_ptr + dst, (m2 + m2_b) + (delta * delta) * (n_a * n_b / n), mask=valid)


TOTALS = {"topk": torch.int64, "positive": torch.int64, "mean": torch.float64, "m2": torch.float64}
"""The totals this kernel folds into, with the dtypes its arithmetic needs.  The declarations of the
statistics it covers (``neurostat.declarations``, which this folder may not import) must name the same
states and dtypes: ``tests/test_declarations.py`` checks that they do."""
PARTIALS = ("topk", "positive", "s1", "s2")
"""The batch sums it reads: the two counts and the moments' shifted sums."""
BLOCK = 1024
"""Columns per program (on CUDA; the interpreter uses 16 so that small tests cross blocks)."""


def fold_sums(
    sums: dict[str, torch.Tensor],
    labels: torch.Tensor,
    counts: torch.Tensor,
    tokens: torch.Tensor,
    shift: torch.Tensor | None,
    totals: dict[str, torch.Tensor],
) -> None:
    """Adds the batch's ``topk``/``positive`` counts [U, D] to the int64 totals at rows ``labels`` and
    folds its shifted sums ``s1``/``s2`` into the float64 ``mean``/``m2`` (Chan et al.), in place (``counts``: tokens
    per batch label, ``tokens``: tokens per label before the batch)."""
    num = labels.numel()
    if not num:
        return
    width = next(iter(totals.values())).shape[1]
    for name, t in totals.items():
        if name not in TOTALS:
            raise ValueError(f"fold_sums folds {tuple(TOTALS)}, not {name!r}")
        dtype = TOTALS[name]
        if not t.is_contiguous() or t.dtype != dtype:
            raise ValueError(f"totals[{name!r}] must be a contiguous {dtype} matrix, got {t.dtype}")
    for name, t in sums.items():
        if name not in PARTIALS:
            raise ValueError(f"fold_sums reads the sums {PARTIALS}, not {name!r}")
        if t.shape != (num, width) or not t.is_contiguous():
            raise ValueError(f"sums[{name!r}] must be a contiguous [{num}, {width}] matrix, got {tuple(t.shape)}")
    moments = "mean" in totals
    dummy = torch.empty(1, dtype=torch.float64, device=labels.device)
    block = min(BLOCK if labels.is_cuda else 16, triton.next_power_of_2(width))
    _fold_kernel[(num, triton.cdiv(width, block))](
        labels,
        counts,
        tokens,
        shift.contiguous() if moments else dummy,
        sums.get("topk", dummy) if "topk" in totals else dummy,
        sums.get("positive", dummy) if "positive" in totals else dummy,
        sums["s1"] if moments else dummy,
        sums["s2"] if moments else dummy,
        totals.get("topk", dummy),
        totals.get("positive", dummy),
        totals.get("mean", dummy),
        totals.get("m2", dummy),
        width,
        BLOCK=block,
        DO_TOPK="topk" in totals,
        DO_POS="positive" in totals,
        DO_MOM=moments,
        num_warps=4,
    )
