"""Triton decode kernel for GCA: a few new tokens (T = 1 or 2) against the cached chunk K/V, no gradient.

Decode has too few query rows to fill a tile per program, so the work is split over slots instead: one program per
(slot, batch x KV head, token) loads one selected chunk and the G query heads of its KV group (padded to 16 MMA rows)
and writes w_k * O_k; the K per-slot outputs are then summed (stage 2 is linear, so the split is exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..utils import dot_precision, interpreter_enabled, next_power_of_2
from .triton_attention import LOG2E, MIN_BLOCK_M, _chunk_rows


@triton.jit
def _gca_decode_kernel(
    Q, K, V, W, IDX, PART,
    kv_len, num_tokens,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    qk_scale,
    NUM_SLOTS: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    OFF_BY_ONE: tl.constexpr, NULL_SLOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    t = tl.program_id(2)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS

    g = tl.arange(0, BLOCK_M)
    row_ok = g < GROUP
    head = h * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q_off = b.to(tl.int64) * stride_qb + t * stride_qt + head * stride_qh
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    sel = (b * num_tokens + t) * NUM_SLOTS + s
    e = tl.load(IDX + sel)
    w = tl.where(e >= 0, tl.load(W + sel), 0.0)
    kv_row, exists, read = _chunk_rows(tl.maximum(e, 0), kv_len, CHUNK, NULL_SLOT)
    kv_off = b.to(tl.int64) * stride_kb + h * stride_kh + kv_row.to(tl.int64) * stride_kt
    k = tl.load(K + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
    v = tl.load(V + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    scores = tl.where(exists[None, :], scores, float("-inf"))
    m = tl.max(scores, 1)
    if OFF_BY_ONE:
        m = tl.maximum(m, 0.0)
    m = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(scores - m[:, None])
    denom = tl.sum(p, 1)
    if OFF_BY_ONE:
        denom += tl.exp2(-m)
    denom = tl.where(denom == 0.0, 1.0, denom)
    out = tl.dot((p * (w / denom)[:, None]).to(v.dtype), v, input_precision=DOT_PRECISION)
    # PART: [B, T, K, Hq, D] fp32
    part_off = (sel.to(tl.int64) * NUM_KV_HEADS * GROUP + head) * HEAD_DIM
    tl.store(PART + part_off[:, None] + d[None, :], out, mask=row_ok[:, None])


def gca_decode_triton(q, k_cache, v_cache, weights, indices, *, chunk_size, sm_scale, softmax_off_by_one,
                      landmark_null_slot):
    """q [B,T,Hq,D], caches [B,Lc,Hk,D] contiguous; weights fp32 / indices int32 [B,T,K]. Returns o [B,T,Hq,D]."""
    B, T, Hq, D = q.shape
    Lc, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    K = indices.shape[-1]
    weights, indices = weights.contiguous(), indices.contiguous()
    part = torch.empty((B, T, K, Hq, D), device=q.device, dtype=torch.float32)
    options = {} if interpreter_enabled() else dict(num_warps=4, num_stages=2)
    _gca_decode_kernel[(K, B * Hk, T)](
        q, k_cache, v_cache, weights, indices, part,
        Lc, T,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        sm_scale * LOG2E,
        NUM_SLOTS=K, CHUNK=chunk_size, GROUP=G, NUM_KV_HEADS=Hk, HEAD_DIM=D,
        BLOCK_M=max(MIN_BLOCK_M, next_power_of_2(G)),
        OFF_BY_ONE=softmax_off_by_one, NULL_SLOT=landmark_null_slot, DOT_PRECISION=dot_precision(q.dtype),
        **options,
    )
    return part.sum(2).to(q.dtype)
