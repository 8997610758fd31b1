"""``ffn_up_stats``: the FFN's first GEMM and activation with per-label statistics in the epilogue.

Computes ``y = act(x W1ᵀ + b1)`` (fp32 accumulation, output in the input dtype — the FFN needs y for
W2 anyway — or in fp32 with ``out_dtype``, for statistics of the unrounded activations) and, in the
epilogue, adds per label the positive counts and the shifted moment sums Σ(a − c), Σ(a − c)² of the
token rows into per-batch buffers, so those statistics cost no second read.

Row order: the program tiles walk the rows in the order ``perm`` (token rows sorted by label first,
then all other rows), so a tile of token rows holds a few long runs of one label.  A segmented
scan along the rows sums each run inside the tile and one atomic per run and column lands in the
buffer (MoE-align style sorting instead of one atomic per element or one-hot products).

The statistics are taken on the stored y (rounded to its dtype), the value the top-k kernel sees.
Counts are exact int32 atomics; moment sums are fp32 atomics.  fp32 inputs use ``input_precision="ieee"``
(set ``ieee=False`` for TF32 speed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"gelu": 0, "gelu_new": 1, "gelu_pytorch_tanh": 1, "relu": 2}
TILES = {"block": (64, 128, 64), "num_warps": 4, "num_stages": 4, "group_m": 8}
"""Tile shape on CUDA (bench/kernel_bench.py measures the choices)."""
INTERPRETER_TILES = {"block": (16, 16, 16), "num_warps": 4, "num_stages": 1, "group_m": 4}


@triton.jit
def _seg_add(p1, d1, q1, f1, p2, d2, q2, f2):
    return tl.where(f2, p2, p1 + p2), tl.where(f2, d2, d1 + d2), tl.where(f2, q2, q1 + q2), f1 | f2


@triton.jit
def _ffn_up_stats_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    perm_ptr,
    lab_ptr,
    shift_ptr,
    pos_ptr,
    s1_ptr,
    s2_ptr,
    M,
    N,
    K,
    n_tokens,
    stride_xm,
    stride_wn,
    stride_ym,
    ACT: tl.constexpr,
    DO_STATS: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    row_ok, col_ok = rm < M, rn < N
    rows = tl.load(perm_ptr + rm, mask=row_ok, other=0).to(tl.int64)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k_ok = rk + k0 < K
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BK
        w_ptrs += BK
    z = acc + tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 0:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        z = 0.5 * z * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0))
    else:
        z = tl.maximum(z, 0.0)
    out = z.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_ym + rn[None, :], out, mask=row_ok[:, None] & col_ok[None, :])

    if DO_STATS:
        if pid_m * BM < n_tokens:
            tile_end = min(pid_m * BM + BM, n_tokens)
            lab = tl.load(lab_ptr + rm, mask=rm < tile_end, other=-1)
            prev = tl.load(lab_ptr + rm - 1, mask=(rm > pid_m * BM) & (rm < tile_end), other=-2)
            nxt = tl.load(lab_ptr + rm + 1, mask=rm + 1 < tile_end, other=-2)
            is_tok = lab >= 0
            a_val = out.to(tl.float32)
            shift = tl.load(shift_ptr + rn, mask=col_ok, other=0.0)
            p = tl.where(is_tok[:, None] & (a_val > 0), 1.0, 0.0)
            d = tl.where(is_tok[:, None], a_val - shift[None, :], 0.0)
            q = d * d
            start = tl.broadcast_to((lab != prev)[:, None], (BM, BN))
            p, d, q, start = tl.associative_scan((p, d, q, start), 0, _seg_add)
            last = is_tok & (nxt != lab)
            mask = last[:, None] & col_ok[None, :]
            where = lab.to(tl.int64)[:, None] * N + rn[None, :]
            tl.atomic_add(pos_ptr + where, p.to(tl.int32), mask=mask)
            tl.atomic_add(s1_ptr + where, d, mask=mask)
            tl.atomic_add(s2_ptr + where, q, mask=mask)


def ffn_up_stats(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    activation: str,
    perm: torch.Tensor,
    sorted_labels: torch.Tensor,
    num_labels: int,
    shift: torch.Tensor | None,
    stats: bool = True,
    ieee: bool = True,
    tiles: dict | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``y = act(x @ weight.T + bias)`` [M, N] and per-label sums of the token rows.

    ``perm`` [M] int32 lists every row once, the ``len(sorted_labels)`` token rows first, sorted by their
    labels ``sorted_labels`` (int32 in [0, num_labels)).  Returns (y, {"positive", "s1", "s2"}).
    ``tiles``: block shape (BM, BN, BK), num_warps, num_stages, group_m [default: TILES for the device].
    ``out_dtype``: y's dtype [default: x's]; fp32 keeps the accumulator unrounded for the statistics.
    """
    tiles = {**(TILES if x.is_cuda else INTERPRETER_TILES), **(tiles or {})}
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no fused kernel (have {sorted(ACTIVATIONS)})")
    if x.dim() != 2 or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("x [M, K] and weight [N, K] must be row-major")
    M, K = x.shape
    N = weight.shape[0]
    if weight.shape[1] != K or perm.numel() != M:
        raise ValueError(f"shapes do not match: x {tuple(x.shape)}, weight {tuple(weight.shape)}, perm {perm.numel()}")
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    sums = {}
    if stats:
        sums = {
            "positive": torch.zeros((num_labels, N), dtype=torch.int32, device=x.device),
            "s1": torch.zeros((num_labels, N), dtype=torch.float32, device=x.device),
            "s2": torch.zeros((num_labels, N), dtype=torch.float32, device=x.device),
        }
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    bm, bn, bk = tiles["block"]
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _ffn_up_stats_kernel[grid](
        x,
        weight,
        bias,
        y,
        perm,
        sorted_labels if stats else perm,
        shift.float().contiguous() if stats else dummy,
        sums.get("positive", dummy),
        sums.get("s1", dummy),
        sums.get("s2", dummy),
        M,
        N,
        K,
        sorted_labels.numel() if stats else 0,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        ACT=ACTIVATIONS[activation],
        DO_STATS=stats,
        IEEE=ieee and x.dtype == torch.float32,
        BM=bm,
        BN=bn,
        BK=bk,
        GROUP_M=tiles["group_m"],
        num_warps=tiles["num_warps"],
        num_stages=tiles["num_stages"],
    )
    return y, sums
