"""Triton kernels for HSA sparse chunk attention, forward and backward, and their autograd op.

Every (token t, KV head h, slot k) pair attends to one chunk c = indices[t, h, k] with all G query heads of the
group; each chunk has its own softmax (with an optional null logit 0), and the per-chunk outputs O_k are summed with
the weights w[t, h, k]. Loop orders ("schedules"):

token  one program per (token, KV head): the G query heads fill the MMA rows and the program gathers its K chunks
       (one TMA box per chunk on sm_90+). Efficient for G >= 16. The same loop computes dq in the backward, either
       recomputing dS_k from the gathered K/V ("token" backward) or reading the dS_k rows the chunk backward wrote.
chunk  one program per (chunk, KV head): it loads the chunk's K/V once and visits only the (token, slot) pairs
       that selected it, packing BLOCK_P pairs x G heads into one tile (reverse index, built by a stable sort).
       Per-slot outputs go to a [B, L, Hk, K, G, D] buffer that a third kernel sums over the valid slots. The
       backward recomputes Delta and writes dK, dV and dw, and for dq either per-slot dq rows (summed like the
       forward's, KV-head group by KV-head group with the sums on a second stream) or, when G >= 16 and S < D,
       per-slot dS rows [B, L, Hk, K, G, S] that the token kernel multiplies by the gathered K chunks (half the
       bytes, one MMA less in the chunk kernel).
chunk by token ranges (the default for bf16 on GPUs, long enough memories): the chunk forward takes one token range
       at a time, so that its q rows stay in L2, and each pair adds its weighted output into the output with
       atomics; for G >= 16 the chunk backward splits by the same ranges and adds dq the same way. The
       accumulators are fp16 for bf16 inputs (half the atomic traffic that bounds these kernels), holding their sums
       times a power of two from a bound on every partial sum (see _fp16_accumulator_scale); fp32 otherwise.
rows   (forward only, G >= 16 and S < D when a backward follows) the chunk kernel, by token ranges whose q rows
       stay in L2, writes each pair's weighted softmax rows w_k P_k [G, S]; the token kernel then sums P_k V_k over
       the gathered V chunks. The token forward gathers K and V for every pair (bound by the L2's bandwidth); this
       one gathers V only, for P rows that are a quarter of a K/V chunk pair's bytes.

The forward and backward schedules are chosen independently (the saved log-sum-exp has one layout, and the reverse
index one layout for all: a chunk's pairs in token order, split into token ranges that kernels take one at a time or
all at once): the chunk backward is the faster one on H100 for every measured group size, at the price of a per-slot
buffer; the token backward needs none, nor does the chunk backward split into token ranges
(``TUNING["bwd_token_range"]``), which adds dK/dV and dq into fp32 tensors with atomics. A token forward that a
backward will follow builds the backward's reverse index on a side stream beside its kernel.

Backward formulas (natural-log units; P_k recomputed from the saved log-sum-exp):
  dP_k = dO V_k^T,  Delta_k = <O_k, dO> = rowsum(P_k * dP_k) (each chunk is a single softmax block),
  dS_k = w_k P_k * (dP_k - Delta_k),  dq = scale sum_k dS_k K_k,  dK_c = scale sum dS_k^T q,
  dV_c = sum (w_k P_k)^T dO,  dw_k = sum_g Delta_k.
Invalid slots (index < 0 or >= C) are skipped everywhere; their weight gradient is 0.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from megatron_ext.kernels.utils import (
    dot_precision,
    empty_output,
    interpreter_enabled,
    next_power_of_2,
    segment_offsets,
)

__all__ = ["HSAAttentionFunction", "ReverseIndex", "build_reverse_index", "hsa_attention_forward"]

LOG2E = 1.0 / math.log(2.0)
# Launch parameters per kernel: (num_warps, num_stages), or {head-dim block: (num_warps, num_stages)} with the
# "default" entry for other head dims; token-schedule warps are per 16 x 128 accumulator tile (more rows or a wider
# head dim scale them up). "*_rows" = pairs x group heads per chunk-schedule tile.
# Defaults from the H100 sweeps in benchmarks/results/hsa.md; benchmarks may overwrite entries (hsa.py --sweep).
TUNING = {
    "token_fwd": (1, 3),
    "token_fwd_rows": (2, 2),  # the token kernel of the P-row forward ("fwd_p_rows" below)
    "token_bwd": (2, 2),
    "chunk_fwd": (4, 1),
    "chunk_fwd_p": (4, 1),  # the P-row chunk kernel; A at 64K: (4, 1) 64 rows 15.0 ms, (4, 2) 15.7, (8, 1) 17.0
    "chunk_bwd": {64: (8, 3), 128: (8, 3), "default": (8, 1)},  # 128: (8, 2) -> (8, 3): C at 64K 8.9 -> 7.9 ms
    "chunk_bwd_ds": {"default": (4, 3)},  # the chunk backward that writes dS rows ("bwd_dq" below)
    "slot_sum": (4, 1),
    "chunk_fwd_rows": 64,
    "chunk_fwd_p_rows": 64,
    "chunk_bwd_rows": 128,
    "chunk_bwd_ds_rows": 64,  # A at 64K: 64 rows (4, 3) 26.6 ms, 128 rows (8, 3) 27.3-27.5, (8, 2) 28.3
    # Chunk backward split into token ranges of this many tokens, adding dq (into an accumulator, "bwd_dq_acc") and
    # dK/dV (into fp32) with atomics (0 = no split: deterministic, no atomics, but per-slot dq or dS rows: up to K
    # times dq's memory). "auto" (see _bwd_token_range): with an fp16 dq accumulator and G >= 16, the forward's
    # ranges if there are at most 16 (_auto_token_range; A at 64K: 27.3 -> 26.0 ms and half the memory, hsa.md
    # run 21); otherwise 1024-token ranges when there are few chunk programs (B * Hk * C <= 4 per SM), whose longest one
    # (chunk 0, selected by about K*S*(1 + ln(C/K)) pairs) would otherwise set the kernel's time (session 3: 2.2x
    # faster for the 345M model's HSA layer at 8K).
    "bwd_token_range": "auto",
    # Chunk forward by token ranges of this many tokens, adding into an output accumulator with atomics (0 = one
    # range and a per-slot output buffer summed by a second kernel: deterministic, but K times the output's memory).
    # "auto": _auto_token_range when the accumulator is fp16, else 0.
    "fwd_token_range": "auto",
    # The accumulator of that atomic forward: "fp32", or "fp16" holding the output times a power of two chosen so
    # that no partial sum can overflow (see _fp16_accumulator_scale); "auto": fp16 for bf16 inputs of at least
    # FP16_ACCUMULATOR_MIN_ELEMENTS (3 mantissa bits more than the output; half the atomic traffic: A at 64K, chunk
    # kernel 14.5 -> 9.0 ms), fp32 otherwise.
    "fwd_atomic_acc": "auto",
    # The same for dq in the chunk backward split into token ranges (dK/dV, sums over many more pairs, stay fp32).
    "bwd_dq_acc": "auto",
    # Token forward loads K/V chunks with TMA bulk copies (one per chunk) instead of per-thread loads (sm_90+, rows
    # of at most 256 bytes, K/V starting on 16 bytes; otherwise per-thread loads).
    "token_fwd_tma": True,
    # The chunk backward with per-slot dq rows runs in up to this many KV-head groups (G >= 16, at least 4 chunk
    # programs per SM each); each group's slot sum (memory bound) runs on a second stream beside the next group's
    # chunk kernel. Config A on the H100 (before dS rows): 31.3 -> 29.7 ms at 64K, 63.1 -> 60.2 ms at 128K.
    "bwd_head_groups": 4,
    # What the unsplit chunk backward writes per (token, slot) for dq: "dq" rows summed by the slot-sum kernel, or
    # "ds" rows (dS, [G, S] per pair) that the token kernel multiplies by the gathered K chunks; "auto": "ds" when
    # G >= 16 and S < D (see _bwd_dq_rows).
    "bwd_dq": "auto",
    # The token forward of a pass that a backward will follow builds the backward's reverse index on a side stream
    # beside its kernel (A at 64K: fwd + bwd 45.44 -> 45.19 ms).
    "reverse_index_beside_fwd": True,
    # Forward of G >= 16 when a backward follows (see _fwd_p_rows): a chunk kernel by token ranges of this many
    # tokens (their q rows stay in L2) writes each pair's weighted softmax rows w_k P_k [G, S] in q's dtype, then the
    # token kernel sums P_k V_k over the gathered V chunks: K is never gathered. Its per-slot buffer is as large as
    # the backward's dS rows, hence only when a backward follows; the index by token ranges serves the backward.
    # A at 64K (hsa.md, run 9): 17.2 -> 15.2 ms (exploratory runs: ranges of 512 15.4, 2048 15.1, unsplit 19.6).
    "fwd_p_rows": "auto",
    "fwd_p_rows_range": 1024,
}


@triton.jit
def _load_chunk(base, c, stride_l, offs_s, offs_d, d_mask, S: tl.constexpr):
    """Rows [c*S, (c+1)*S) of one KV head: [S, BLOCK_D] (columns outside ``d_mask`` read as 0)."""
    rows = (c * S + offs_s).to(tl.int64)
    return tl.load(base + rows[:, None] * stride_l + offs_d[None, :], mask=d_mask[None, :], other=0.0)


@triton.jit
def _chunk_softmax(q, kc, qk_scale, OFF_BY_ONE: tl.constexpr, PREC: tl.constexpr):
    """Unnormalised softmax of q against one chunk (base 2): (p = exp2(s - m), row max m, row sum l); with
    OFF_BY_ONE a null logit 0 joins every row (m >= 0, l includes exp2(-m))."""
    s = tl.dot(q, tl.trans(kc), input_precision=PREC) * qk_scale
    m = tl.max(s, 1)
    if OFF_BY_ONE:
        m = tl.maximum(m, 0.0)
    p = tl.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    if OFF_BY_ONE:
        l += tl.exp2(-m)
    return p, m, l


@triton.jit
def _hsa_fwd_token_kernel(
    Q, K, V, W, IDX, O, LSE, K_DESC, V_DESC,
    qk_scale, L, batch_rows, kv_rows,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh,
    HK: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, OFF_BY_ONE: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr,
):
    """With TMA, K/V chunks are loaded through the descriptors K_DESC / V_DESC over K and V seen as
    [kv_rows = B * batch_rows, Hk*D] (one bulk copy per chunk); an invalid slot reads rows past the end: zeros, no
    memory traffic. Indices >= NC = batch_rows / S are invalid: they would read another sample's rows."""
    t = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // HK
    h = bh % HK
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S)
    g_mask = offs_g < G
    d_mask = offs_d < D
    tile_mask = g_mask[:, None] & d_mask[None, :]
    q_off = b.to(tl.int64) * s_qb + t.to(tl.int64) * s_ql + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :]
    q = tl.load(Q + q_off, mask=tile_mask, other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + h * s_kh
    v_base = V + b.to(tl.int64) * s_kb + h * s_kh
    sel = ((b.to(tl.int64) * L + t) * HK + h) * TOPK
    nc = batch_rows // S
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for slot in range(TOPK):
        # Branch-free so the loop pipelines: an invalid slot (index < 0 or >= NC) loads nothing and gets weight 0.
        c = tl.load(IDX + sel + slot)
        ok = (c >= 0) & (c < nc)
        w = tl.where(ok, tl.load(W + sel + slot), 0.0)
        c = tl.maximum(c, 0)
        if TMA:
            row = tl.where(ok, b * batch_rows + c * S, kv_rows).to(tl.int32)
            kc = K_DESC.load([row, h * D])
            vc = V_DESC.load([row, h * D])
        else:
            kc = _load_chunk(k_base, c, s_kl, offs_s, offs_d, d_mask & ok, S)
            vc = _load_chunk(v_base, c, s_kl, offs_s, offs_d, d_mask & ok, S)
        p, m, l = _chunk_softmax(q, kc, qk_scale, OFF_BY_ONE, PREC)
        o_k = tl.dot(p.to(vc.dtype), vc, input_precision=PREC)
        acc += o_k * (w / l)[:, None]
        tl.store(LSE + (sel + slot) * G + offs_g, m + tl.log2(l), mask=g_mask & ok)
    tl.store(O + q_off, acc.to(O.dtype.element_ty), mask=tile_mask)


@triton.jit
def _segment(OFFSETS, b, h, c, r, NC, NR, RP, HK: tl.constexpr):
    """[start, end) in the reverse index of chunk c's pairs from launch range r, for an index split into NR * RP
    token ranges of which each launch range covers RP (segment ((b*Hk + h)*NC + c)*NR*RP + r*RP + j)."""
    seg = ((b * HK + h) * NC + c) * (NR * RP) + r * RP
    return tl.load(OFFSETS + seg), tl.load(OFFSETS + seg + RP)


@triton.jit
def _hsa_fwd_chunk_kernel(
    Q, K, V, W, PAIRS, OFFSETS, OUT, LSE, OUT_SCALE,
    qk_scale, L, NC, NR, RP, h0, NH,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh,
    HK: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    OFF_BY_ONE: tl.constexpr, OUT_ROWS: tl.constexpr, PREC: tl.constexpr,
):
    """One (chunk, token range, KV head h0 + i < h0 + NH): the chunk's K (and V) are loaded once for all pairs of
    the range that selected it; OUT_ROWS says what each pair writes:

    "o"        its weighted output w_k O_k to its row of the per-slot buffer OUT [B, L, Hk, K, G, D];
    "o_atomic" the same times OUT_SCALE[0], added into the accumulator OUT [B, L, Hq, D] (Q's strides; fp32, or
               fp16 with a power-of-two scale that keeps every partial sum in range) with atomics;
    "p"        its weighted softmax rows w_k P_k to its row of the per-slot buffer OUT [B, L, Hk, K, G, S], which the
               token kernel multiplies by the gathered V chunks (V is not read here).
    The programs of one token range run together, so their q rows (and atomic output rows) stay in L2.
    """
    c = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2) // NH
    h = h0 + tl.program_id(2) % NH
    start, end = _segment(OFFSETS, b, h, c, r, NC, NR, RP, HK)
    if end > start:  # most programs of late chunks in early ranges have no pairs: no K/V traffic
        offs_d = tl.arange(0, BLOCK_D)
        offs_s = tl.arange(0, S)
        d_mask = offs_d < D
        kv_base = b.to(tl.int64) * s_kb + h * s_kh
        kc = _load_chunk(K + kv_base, c, s_kl, offs_s, offs_d, d_mask, S)
        if OUT_ROWS != "p":
            vc = _load_chunk(V + kv_base, c, s_kl, offs_s, offs_d, d_mask, S)
        offs_r = tl.arange(0, BLOCK_P * BLOCK_G)
        r_pair = offs_r // BLOCK_G
        r_g = offs_r % BLOCK_G
        r_mask = (start + r_pair < end) & (r_g < G)
        pair = tl.load(PAIRS + start + r_pair, mask=r_mask, other=0)
        if OUT_ROWS == "o_atomic":
            out_scale = tl.load(OUT_SCALE)
        for p0 in range(start, end, BLOCK_P):
            t = (pair // TOPK).to(tl.int64)
            slot = pair % TOPK
            tile_mask = r_mask[:, None] & d_mask[None, :]
            q_off = b.to(tl.int64) * s_qb + t * s_ql + (h * G + r_g) * s_qh
            q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
            sel = ((b.to(tl.int64) * L + t) * HK + h) * TOPK + slot
            w = tl.load(W + sel, mask=r_mask, other=0.0)
            # the next tile's pairs, loaded while this tile computes (a dependent load off the critical path)
            next_mask = (p0 + BLOCK_P + r_pair < end) & (r_g < G)
            next_pair = tl.load(PAIRS + p0 + BLOCK_P + r_pair, mask=next_mask, other=0)
            p, m, l = _chunk_softmax(q, kc, qk_scale, OFF_BY_ONE, PREC)
            row = sel * G + r_g
            if OUT_ROWS == "p":
                tl.store(OUT + row[:, None] * S + offs_s[None, :], (p * (w / l)[:, None]).to(OUT.dtype.element_ty),
                         mask=r_mask[:, None])
            else:
                o_k = tl.dot(p.to(vc.dtype), vc, input_precision=PREC) * (w / l)[:, None]
                if OUT_ROWS == "o_atomic":
                    o_k = (o_k * out_scale).to(OUT.dtype.element_ty)
                    tl.atomic_add(OUT + q_off[:, None] + offs_d[None, :], o_k, mask=tile_mask, sem="relaxed")
                else:
                    tl.store(OUT + row[:, None] * D + offs_d[None, :], o_k.to(OUT.dtype.element_ty), mask=tile_mask)
            tl.store(LSE + row, m + tl.log2(l), mask=r_mask)
            pair = next_pair
            r_mask = next_mask


@triton.jit
def _slot_sum_kernel(
    BUF, IDX, OUT, L, NC, h0, NH,
    s_ob, s_ol, s_oh,
    HK: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[b, t, h*G + g, :] = sum over valid slots (0 <= index < NC) of BUF[b, t, h, slot, g, :] (BUF is
    [B, L, Hk, K, G, D]), for the NH KV heads from h0; the chunk kernels write no row for other slots."""
    t = tl.program_id(0)
    b = tl.program_id(1) // NH
    h = h0 + tl.program_id(1) % NH
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    tile_mask = (offs_g < G)[:, None] & (offs_d < D)[None, :]
    sel = ((b.to(tl.int64) * L + t) * HK + h) * TOPK
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for slot in range(TOPK):
        c = tl.load(IDX + sel + slot)
        if (c >= 0) & (c < NC):
            row = (sel + slot) * G + offs_g
            acc += tl.load(BUF + row[:, None] * D + offs_d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
    o_off = b.to(tl.int64) * s_ob + t.to(tl.int64) * s_ol + (h * G + offs_g)[:, None] * s_oh + offs_d[None, :]
    tl.store(OUT + o_off, acc.to(OUT.dtype.element_ty), mask=tile_mask)


@triton.jit
def _unscale_kernel(ACC, OUT, SCALE, N, BLOCK: tl.constexpr):
    """OUT = ACC / SCALE[0] in OUT's dtype (a power-of-two scale: the division is exact)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.load(ACC + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (acc * (1.0 / tl.load(SCALE))).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _hsa_token_rows_kernel(
    Q, K, V, W, IDX, DO, LSE, ROWS, OUT, K_DESC, V_DESC,
    qk_scale, out_scale, L, batch_rows, kv_rows, h0, NH,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh,
    HK: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, ROWS_IN: tl.constexpr, TMA: tl.constexpr, PREC: tl.constexpr,
):
    """One (token, KV head h0 + i < h0 + NH): OUT = out_scale * sum_k R_k X_k over the selected chunks X_k of K
    (gathered as the token forward does: TMA boxes or per-thread loads), with rows R_k [G, S] either read from the
    per-slot buffer ROWS [B, L, Hk, K, G, S] (ROWS_IN) or recomputed as dS_k from q, dO and the gathered K/V.

    dq = scale * sum_k dS_k K_k with the chunk backward's dS rows or recomputed; the forward's output
    O = sum_k (w_k P_k) V_k with the P-row chunk kernel's rows, K / K_DESC then being V / V_DESC and out_scale 1.
    Q, DO, OUT share strides."""
    t = tl.program_id(0)
    b = tl.program_id(1) // NH
    h = h0 + tl.program_id(1) % NH
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S)
    g_mask = offs_g < G
    d_mask = offs_d < D
    tile_mask = g_mask[:, None] & d_mask[None, :]
    q_off = b.to(tl.int64) * s_qb + t.to(tl.int64) * s_ql + (h * G + offs_g)[:, None] * s_qh + offs_d[None, :]
    if not ROWS_IN:
        q = tl.load(Q + q_off, mask=tile_mask, other=0.0)
        do = tl.load(DO + q_off, mask=tile_mask, other=0.0)
    k_base = K + b.to(tl.int64) * s_kb + h * s_kh
    v_base = V + b.to(tl.int64) * s_kb + h * s_kh
    sel = ((b.to(tl.int64) * L + t) * HK + h) * TOPK
    nc = batch_rows // S
    dq = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for slot in range(TOPK):
        c = tl.load(IDX + sel + slot)
        ok = (c >= 0) & (c < nc)  # indices >= NC would read another sample's rows
        c = tl.maximum(c, 0)
        if TMA:
            row = tl.where(ok, b * batch_rows + c * S, kv_rows).to(tl.int32)
            kc = K_DESC.load([row, h * D])
        else:
            kc = _load_chunk(k_base, c, s_kl, offs_s, offs_d, d_mask & ok, S)
        rows = (sel + slot) * G + offs_g
        if ROWS_IN:
            ds = tl.load(ROWS + rows[:, None] * S + offs_s[None, :], mask=(g_mask & ok)[:, None], other=0.0)
        else:
            w = tl.where(ok, tl.load(W + sel + slot), 0.0)
            if TMA:
                vc = V_DESC.load([row, h * D])
            else:
                vc = _load_chunk(v_base, c, s_kl, offs_s, offs_d, d_mask & ok, S)
            lse = tl.load(LSE + rows, mask=g_mask & ok, other=0.0)
            s = tl.dot(q, tl.trans(kc), input_precision=PREC) * qk_scale
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(vc), input_precision=PREC)
            delta = tl.sum(p * dp, 1)  # = <O_k, dO>: one softmax block per chunk, so no O_k recompute is needed
            ds = (p * (dp - delta[:, None]) * w).to(kc.dtype)
        dq += tl.dot(ds, kc, input_precision=PREC)
    tl.store(OUT + q_off, (dq * out_scale).to(OUT.dtype.element_ty), mask=tile_mask)


@triton.jit
def _hsa_bwd_chunk_kernel(
    Q, K, V, W, DO, LSE, DW, PAIRS, OFFSETS, DK, DV, DQBUF, DQ_SCALE,
    qk_scale, sm_scale, L, NC, NR, RP, h0, NH,
    s_qb, s_ql, s_qh, s_kb, s_kl, s_kh,
    HK: tl.constexpr, G: tl.constexpr, TOPK: tl.constexpr, S: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    DQ_OUT: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
):
    """dK/dV of one (chunk, token range, KV head h0 + i < h0 + NH) from the pairs that selected it, each pair's
    weight gradient dw = sum_g Delta (to DW [B, L, Hk, K]) and, by DQ_OUT, what dq needs:
    "none"; "dq": each pair's dq, to its row of the per-slot buffer DQBUF [B, L, Hk, K, G, D] (or, with SPLIT, times
    DQ_SCALE[0] added into the accumulator DQBUF with Q's strides); "ds": each pair's dS (the operand of dq = dS K,
    in K's dtype) to its row of the per-slot buffer DQBUF [B, L, Hk, K, G, S], which the token kernel multiplies by
    the gathered K.

    Without SPLIT there is one launch range (NR = 1, over all RP ranges of the index) and dK/dV are stored; with
    SPLIT the programs of one token range run together (their q/dO and dq rows stay in L2) and add their partial
    dK/dV into fp32 DK/DV with atomics.
    Q and DO share strides; K, V, DK, DV share strides.
    """
    c = tl.program_id(0)
    r = tl.program_id(1)
    b = tl.program_id(2) // NH
    h = h0 + tl.program_id(2) % NH
    start, end = _segment(OFFSETS, b, h, c, r, NC, NR, RP, HK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_s = tl.arange(0, S)
    d_mask = offs_d < D
    kv_off = b.to(tl.int64) * s_kb + h * s_kh
    kc = _load_chunk(K + kv_off, c, s_kl, offs_s, offs_d, d_mask, S)
    vc = _load_chunk(V + kv_off, c, s_kl, offs_s, offs_d, d_mask, S)
    dk = tl.zeros([S, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([S, BLOCK_D], dtype=tl.float32)
    offs_r = tl.arange(0, BLOCK_P * BLOCK_G)
    r_pair = offs_r // BLOCK_G
    r_g = offs_r % BLOCK_G
    if SPLIT and DQ_OUT == "dq":
        dq_scale = tl.load(DQ_SCALE) * sm_scale
    for p0 in range(start, end, BLOCK_P):
        pidx = p0 + r_pair
        r_mask = (pidx < end) & (r_g < G)
        pair = tl.load(PAIRS + pidx, mask=r_mask, other=0)
        t = (pair // TOPK).to(tl.int64)
        slot = pair % TOPK
        tile_mask = r_mask[:, None] & d_mask[None, :]
        q_off = b.to(tl.int64) * s_qb + t * s_ql + (h * G + r_g) * s_qh
        q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        do = tl.load(DO + q_off[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        sel = ((b.to(tl.int64) * L + t) * HK + h) * TOPK + slot
        row = sel * G + r_g
        w = tl.load(W + sel, mask=r_mask, other=0.0)
        lse = tl.load(LSE + row, mask=r_mask, other=0.0)
        s = tl.dot(q, tl.trans(kc), input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(vc), input_precision=PREC)
        # Delta = <O_k, dO> (the chunk is one softmax block); only its sum over the group's heads leaves the
        # kernel: dw of the pair (padding heads and empty pairs have zero q and dO, hence Delta 0)
        delta = tl.sum(p * dp, 1)
        dw = tl.sum(tl.reshape(delta, [BLOCK_P, BLOCK_G]), 1)
        pidx_p = p0 + tl.arange(0, BLOCK_P)
        pair_ok = pidx_p < end
        pair_p = tl.load(PAIRS + pidx_p, mask=pair_ok, other=0)
        sel_p = ((b.to(tl.int64) * L + pair_p // TOPK) * HK + h) * TOPK + pair_p % TOPK
        tl.store(DW + sel_p, dw, mask=pair_ok)
        wp = p * w[:, None]
        dv += tl.dot(tl.trans(wp.to(do.dtype)), do, input_precision=PREC)
        ds = wp * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        if DQ_OUT == "ds":
            tl.store(DQBUF + row[:, None] * S + offs_s[None, :], ds.to(DQBUF.dtype.element_ty), mask=r_mask[:, None])
        if DQ_OUT == "dq":
            dq = tl.dot(ds.to(kc.dtype), kc, input_precision=PREC)
            if SPLIT:
                dq = (dq * dq_scale).to(DQBUF.dtype.element_ty)
                tl.atomic_add(DQBUF + q_off[:, None] + offs_d[None, :], dq, mask=tile_mask, sem="relaxed")
            else:
                dq = (dq * sm_scale).to(DQBUF.dtype.element_ty)
                tl.store(DQBUF + row[:, None] * D + offs_d[None, :], dq, mask=tile_mask)
    rows = (c * S + offs_s).to(tl.int64)
    out_off = kv_off + rows[:, None] * s_kl + offs_d[None, :]
    if SPLIT:
        add_mask = d_mask[None, :] & (end > start)
        tl.atomic_add(DK + out_off, dk * sm_scale, mask=add_mask, sem="relaxed")
        tl.atomic_add(DV + out_off, dv, mask=add_mask, sem="relaxed")
    else:
        tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=d_mask[None, :])
        tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=d_mask[None, :])


@triton.jit
def _reverse_keys_kernel(IDX, KEYS, L, NC, LK, HK: tl.constexpr, TOPK: tl.constexpr, BLOCK: tl.constexpr):
    """Sort keys of the reverse index, [B*Hk, L*K]: (b*Hk + h)*NC + c for a valid slot, B*Hk*NC for an invalid one
    (index < 0 or >= NC: last after the sort; c = NC would alias the next KV head's chunk 0). One launch for what took
    a transposing copy and five element-wise ops."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    bh = tl.program_id(1)
    mask = offs < LK
    t = offs // TOPK
    c = tl.load(IDX + ((bh // HK * L + t).to(tl.int64) * HK + bh % HK) * TOPK + offs % TOPK, mask=mask, other=-1)
    key = tl.where((c >= 0) & (c < NC), bh.to(tl.int64) * NC + c, tl.num_programs(1).to(tl.int64) * NC)
    tl.store(KEYS + bh.to(tl.int64) * LK + offs, key.to(KEYS.dtype.element_ty), mask=mask)


@triton.jit
def _reverse_pairs_kernel(
    ORDER, SORTED, PAIRS, RANGE_KEYS, n, LK, chunks, pairs_per_range, n_ranges,
    SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """pairs = t*K + slot of each sorted entry (int32) and, when SPLIT, its segment key chunk*NR + token range."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    pair = tl.load(ORDER + offs, mask=mask, other=0) % LK
    tl.store(PAIRS + offs, pair.to(tl.int32), mask=mask)
    if SPLIT:
        key = tl.load(SORTED + offs, mask=mask, other=0).to(tl.int64)
        range_key = tl.where(key < chunks, key * n_ranges + pair // pairs_per_range, chunks * n_ranges)
        tl.store(RANGE_KEYS + offs, range_key.to(RANGE_KEYS.dtype.element_ty), mask=mask)


class ReverseIndex(NamedTuple):
    """For every (batch, KV head, chunk, token range), the (token, slot) pairs that selected the chunk.

    ``pairs`` int32 (pair = t*K + slot), sorted by (batch, KV head, chunk, token): the pairs of segment
    i = ((b*Hk + h)*C + c)*NR + r, r = t // ``token_range``, are ``pairs[offsets[i]:offsets[i+1]]``; ``offsets``
    int32 ``[B*Hk*C*NR + 1]``. The NR ranges of one chunk are consecutive, so a kernel can take a chunk's pairs range
    by range or all at once from the same index (NR = 1 when ``token_range`` is 0).
    """

    pairs: torch.Tensor
    offsets: torch.Tensor
    token_range: int


def build_reverse_index(indices: torch.Tensor, num_chunks: int, token_range: int = 0) -> ReverseIndex:
    """The reverse index of ``indices`` ``[B, L, Hk, K]`` (see ``ReverseIndex``); invalid slots (index < 0 or
    >= ``num_chunks``) are left out."""
    B, L, Hk, K = indices.shape
    token_range = token_range if 0 < token_range < L else 0
    n_ranges = 1 if token_range == 0 else -(-L // token_range)
    chunks = B * Hk * num_chunks
    # int32 sort keys when they fit: the radix sort then makes half the passes of an int64 one
    key_dtype = torch.int32 if chunks * n_ranges < 2**31 - 1 else torch.int64
    n = B * Hk * L * K
    block = 1024
    keys = torch.empty(n, device=indices.device, dtype=key_dtype)
    if n:
        _reverse_keys_kernel[(triton.cdiv(L * K, block), B * Hk)](
            indices, keys, L, num_chunks, L * K, HK=Hk, TOPK=K, BLOCK=block
        )
    # stable: the pairs of a chunk keep their token order, so its token ranges are consecutive runs
    sorted_key, order = torch.sort(keys, stable=True)
    pairs = torch.empty(n, device=indices.device, dtype=torch.int32)
    range_keys = torch.empty_like(sorted_key) if n_ranges > 1 else sorted_key
    if n:
        _reverse_pairs_kernel[(triton.cdiv(n, block),)](
            order, sorted_key, pairs, range_keys, n, L * K, chunks, K * max(token_range, 1), n_ranges,
            SPLIT=n_ranges > 1, BLOCK=block,
        )
    return ReverseIndex(pairs, segment_offsets(range_keys, chunks * n_ranges), token_range)


def _pairs_per_tile(group_pad: int, rows_key: str) -> int:
    """Pairs per chunk-schedule tile: TUNING rows, and at least 16 rows (the smallest MMA)."""
    return max(1, TUNING[rows_key] // group_pad, 16 // group_pad)


class PassShape(NamedTuple):
    """What the choice of a pass's token ranges depends on."""

    seq_len: int  # L, query tokens
    kv_len: int  # C * S, memory tokens
    group_size: int  # G
    head_dim: int  # D
    topk: int  # K
    elements: int  # of q (B * L * Hq * D): the size of an output or dq accumulator
    dtype: torch.dtype
    device: torch.device


# Token ranges of the atomic passes with fp16 accumulators (hsa.md run 21, H100, bf16): L/16 rounded down to a power
# of two, from 1024 up to what keeps one KV head's q rows and accumulator rows of a range within 32 MiB of L2
# (G*D*4 bytes a token: config A 4096 tokens); none while one KV head's K (or V) holds fewer than 2**20 elements,
# where the token forward's gathers hit L2 (the 345M model's layer at 8K: token forward 0.42 ms, ranges 0.82 ms), nor
# for top-k < 16, where the fixed costs per token (zero-fill, scale, conversion) weigh more (config B, top-8: 1.08-1.09
# ms against the token forward's 1.06-1.07).
# Measured forward + backward at 64K: A 14.9 + 27.1 -> 11.3 + 25.8 ms (peak 13.7 -> 7.0 GiB); 345M layer 4.07 + 8.2
# -> 2.58 + 6.53 ms; C (forward only) 5.91 -> 3.87 ms.
ATOMIC_RANGE_MIN_KV_ELEMENTS = 2**20
ATOMIC_RANGE_MIN_TOPK = 16
ATOMIC_RANGE_L2_BYTES = 32 * 2**20
# The backward splits by those ranges into at most this many: its fp32 dK/dV partial sums grow with chunks x ranges
# (A at 128K, 32 ranges of 4096 tokens: 64.4 ms against 54.7 unsplit; 16 ranges at 64K: 26.0 against 27.3).
ATOMIC_BWD_MAX_RANGES = 16


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def _auto_token_range(shape: PassShape) -> int:
    """The token range of an atomic pass under "auto" (see ATOMIC_RANGE_*), 0 = none."""
    if interpreter_enabled() or shape.device.type != "cuda":
        return 0
    if shape.kv_len * shape.head_dim < ATOMIC_RANGE_MIN_KV_ELEMENTS or shape.topk < ATOMIC_RANGE_MIN_TOPK:
        return 0
    cap = _prev_power_of_2(ATOMIC_RANGE_L2_BYTES // (shape.group_size * shape.head_dim * 4))
    token_range = min(max(1024, _prev_power_of_2(shape.seq_len // 16)), cap)
    return token_range if token_range < shape.seq_len else 0


def _resolve_token_range(key: str, shape: PassShape, auto) -> int:
    """``TUNING[key]`` as a token range (0 = one range: no atomics), never split under
    torch.use_deterministic_algorithms (Megatron's --deterministic-mode), whose atomics add in no fixed order."""
    token_range = TUNING[key]
    if torch.are_deterministic_algorithms_enabled():
        return 0
    if token_range == "auto":
        token_range = auto()
    if not isinstance(token_range, int) or token_range < 0:
        raise ValueError(f'TUNING["{key}"] must be "auto" or a token count >= 0, got {token_range!r}')
    return token_range if token_range < shape.seq_len else 0


def _fwd_token_range(shape: PassShape) -> int:
    """Token range of the chunk forward's atomic mode, 0 = the per-slot buffer (``TUNING["fwd_token_range"]``)."""
    fp16_acc = _atomic_accumulator("fwd_atomic_acc", shape.dtype, shape.elements) == torch.float16
    return _resolve_token_range("fwd_token_range", shape, lambda: _auto_token_range(shape) if fp16_acc else 0)


def _bwd_token_range(shape: PassShape, chunk_programs: int) -> int:
    """Token range of the chunk backward, 0 = unsplit (``TUNING["bwd_token_range"]``)."""

    def auto():
        fp16_acc = _atomic_accumulator("bwd_dq_acc", shape.dtype, shape.elements) == torch.float16
        if fp16_acc and shape.group_size >= TOKEN_SCHEDULE_MIN_GROUP:
            token_range = _auto_token_range(shape)
            if token_range and -(-shape.seq_len // token_range) <= ATOMIC_BWD_MAX_RANGES:
                return token_range
        if interpreter_enabled() or shape.device.type != "cuda":
            return 0
        return 1024 if chunk_programs <= 4 * _sm_count(shape.device) else 0

    return _resolve_token_range("bwd_token_range", shape, auto)


def _tma_loads(k: torch.Tensor, v: torch.Tensor, D: int, block_d: int) -> bool:
    """Whether the token forward loads K/V chunks with TMA (``TUNING["token_fwd_tma"]``): on sm_90+ GPUs and in the
    interpreter (which emulates it, so CPU tests cover the path), when a chunk's rows of one head are one box of at
    most 256 bytes a row (the widths tested on the H100) and K/V start on 16 bytes (TMA's alignment)."""
    if not TUNING["token_fwd_tma"] or D != block_d or D * k.element_size() > 256:
        return False
    if k.numel() == 0:  # no chunk rows (empty memory): a descriptor needs a non-empty tensor
        return False
    if k.data_ptr() % 16 or v.data_ptr() % 16:
        return False
    if interpreter_enabled():
        return True
    return k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9


def _rows_descriptor(x: torch.Tensor, block_rows: int, block_cols: int):
    """TMA descriptor over contiguous ``x`` [..., rows, Hk, D] seen as [rows, Hk*D], boxes [block_rows, block_cols]."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    width = x.shape[-2] * x.shape[-1]
    return TensorDescriptor(x, [x.numel() // width, width], [width, 1], [block_rows, block_cols])


class _SideStream:
    """A second CUDA stream for work that may overlap the main stream's (on CPU, in the interpreter, or when not
    ``enabled``, the work simply runs in order). ``priority`` < 0 makes the side stream's programs go first whenever
    the GPU has room for them."""

    _streams: dict = {}

    def __init__(self, device: torch.device, enabled: bool = True, priority: int = 0):
        self.main = self.side = None
        if enabled and device.type == "cuda" and not interpreter_enabled():
            self.main = torch.cuda.current_stream(device)
            key = (device, priority)
            if key not in self._streams:
                self._streams[key] = torch.cuda.Stream(device, priority=priority)
            self.side = self._streams[key]

    def run(self, fn) -> None:
        """Run ``fn`` after everything queued so far on the main stream, without holding the main stream up."""
        if self.side is None:
            fn()
            return
        self.side.wait_stream(self.main)
        with torch.cuda.stream(self.side):
            fn()

    def adopt(self, *tensors: torch.Tensor) -> tuple:
        """Tensors allocated on the side stream, handed to the main stream: their memory is not reused before the
        main stream's work at the time they are freed is done."""
        if self.side is not None:
            for t in tensors:
                t.record_stream(self.main)
        return tensors

    def join(self) -> None:
        """The main stream waits for the side stream. Every tensor the side stream touched was allocated on the
        main stream before and is freed on it after this point (or was allocated on the side stream and handed over
        with ``adopt``), so the caching allocator never hands it out early."""
        if self.side is not None:
            self.main.wait_stream(self.side)


def _head_groups(device: torch.device, num_heads: int, programs_per_head: int, group_size: int):
    """(first KV head, number of heads) of each group of the chunk backward with a per-slot dq buffer: up to
    ``TUNING["bwd_head_groups"]`` groups, at most one per KV head, for groups of G >= 16 query heads; each group's
    memory-bound slot sum runs on a side stream beside the next group's chunk kernel."""
    groups = max(1, min(TUNING["bwd_head_groups"], num_heads))
    if group_size < 16:  # measured: no gain for G = 2 (config C, 16K-64K: 0-7% slower)
        groups = 1
    if device.type == "cuda" and not interpreter_enabled():
        # a launch of few programs ends in a long tail: keep >= 4 programs per SM in each group (A at 16K,
        # 256 per group: 8.8 -> 11.3 ms; 1024 and 2048 per group at 64K and 128K: faster)
        per_group = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        groups = max(1, min(groups, num_heads * programs_per_head // per_group))
    bounds = [num_heads * i // groups for i in range(groups + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(groups)]


def _bwd_dq_rows(group_size: int, chunk_size: int, head_dim: int) -> str:
    """``TUNING["bwd_dq"]`` resolved: "auto" writes dS rows when they are smaller than dq rows (S < D) and the token
    kernel's G query-head rows fill its tiles (G >= 16). Measured on the H100 at 64K with the same launch parameters:
    config A (G 16, S 64, D 128) 29.8 -> 29.0 ms backward and 8 GiB less; B (S = D = 64) 2.28 -> 2.65 ms; C (G = 2)
    9.0 -> 21.9 ms."""
    mode = TUNING["bwd_dq"]
    if mode not in ("auto", "ds", "dq"):
        raise ValueError(f'TUNING["bwd_dq"] must be "auto", "ds" or "dq", got {mode!r}')
    if mode == "auto":
        return "ds" if group_size >= 16 and chunk_size < head_dim else "dq"
    return mode


TOKEN_SCHEDULE_MIN_GROUP = 16


def auto_schedules(
    group_size: int, chunk_size: int, head_dim: int, for_backward: bool, shape: PassShape | None = None
) -> tuple[str, str]:
    """(forward, backward) loop orders of ``schedule="auto"``: forward "chunk" when it runs by token ranges into an
    fp16 accumulator (``_fwd_token_range`` of ``shape``: bf16 on a GPU, long enough sequences), else "token" for
    G >= 16 (the group's query heads fill the MMA rows), "rows" when moreover a backward follows and
    ``TUNING["fwd_p_rows"]`` allows it (see ``_fwd_p_rows``), else "chunk"; backward "chunk" (the fastest measured
    for every group size)."""
    if group_size < TOKEN_SCHEDULE_MIN_GROUP or (shape is not None and _fwd_token_range(shape) > 0):
        return "chunk", "chunk"
    return ("rows" if for_backward and _fwd_p_rows(group_size, chunk_size, head_dim) else "token"), "chunk"


def _fwd_p_rows(group_size: int, chunk_size: int, head_dim: int) -> bool:
    """``TUNING["fwd_p_rows"]`` resolved for a pass that a backward follows: "auto" takes the P-row forward when a
    P row is smaller than the K chunk rows it saves gathering (S < D), as the backward's dS rows do. Measured on the
    H100 at 64K: config A (G 16, S 64, D 128) 17.2 -> 15.2 ms; B (S = D = 64, forced on) 1.03 -> 1.40 ms."""
    mode = TUNING["fwd_p_rows"]
    if mode not in ("auto", True, False):
        raise ValueError(f'TUNING["fwd_p_rows"] must be "auto", True or False, got {mode!r}')
    if mode == "auto":
        return group_size >= TOKEN_SCHEDULE_MIN_GROUP and chunk_size < head_dim
    return mode


def pass_shape(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor) -> PassShape:
    B, L, Hq, D = q.shape
    return PassShape(L, k.shape[1], Hq // k.shape[2], D, indices.shape[-1], q.numel(), q.dtype, q.device)


def _launch(name: str, block_d: int = 0, token_tile: int = 0) -> dict:
    """Launch parameters of kernel ``name`` for head-dim block ``block_d``; ``token_tile`` = rows x head-dim block
    of a token-schedule accumulator, whose warps scale with it (the fp32 accumulator lives in registers)."""
    entry = TUNING[name]
    if isinstance(entry, dict):
        entry = entry.get(block_d, entry["default"])
    warps, stages = entry
    if token_tile:
        warps = min(8, warps * max(1, token_tile // (16 * 128)))
    return {"num_warps": warps, "num_stages": stages}


def hsa_attention_forward(
    q, k, v, weights, indices, chunk_size, sm_scale, off_by_one, schedule, reverse=None, for_backward=False
):
    """Launch the forward. All inputs contiguous; weights fp32, indices int32.

    ``schedule``: "token", "chunk" or "rows" (a chunk kernel by token ranges writes each pair's weighted softmax
    rows w_k P_k, then the token kernel sums P_k V_k over the gathered V chunks: K is never gathered).
    Returns ``(o [B, L, Hq, D], lse [B, L, Hk, K, G] fp32 base 2, ReverseIndex or None)``. With ``for_backward``
    the token schedule also builds the reverse index the backward will need, on a high-priority side stream beside
    its kernel (a sort of small keys, hidden under the gather-bound kernel); "rows" builds one by token ranges, which
    the backward reuses.
    """
    B, L, Hq, D = q.shape
    Hk = k.shape[2]
    G, K, S = Hq // Hk, indices.shape[-1], chunk_size
    NC = k.shape[1] // S
    BLOCK_G, BLOCK_D = max(16, next_power_of_2(G)), max(16, next_power_of_2(D))
    prec = dot_precision(q.dtype)
    lse = empty_output(B, L, Hk, K, G, device=q.device, dtype=torch.float32)
    qk_scale = sm_scale * LOG2E
    tma = _tma_loads(k, v, D, BLOCK_D)
    if schedule == "token":
        side = None
        if for_backward and reverse is None and TUNING["reverse_index_beside_fwd"] and NC > 0:
            if _bwd_token_range(pass_shape(q, k, indices), B * Hk * NC) == 0:
                built = []
                side = _SideStream(q.device, priority=-1)  # queued first, so it does not wait for the kernel
                side.run(lambda: built.append(build_reverse_index(indices, NC)))
        o = empty_output(*q.shape, device=q.device, dtype=q.dtype)
        descs = (_rows_descriptor(k, S, BLOCK_D), _rows_descriptor(v, S, BLOCK_D)) if tma else (None, None)
        _hsa_fwd_token_kernel[(L, B * Hk)](
            q, k, v, weights, indices, o, lse, *descs, qk_scale, L, k.shape[1], B * k.shape[1],
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            HK=Hk, G=G, TOPK=K, S=S, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, OFF_BY_ONE=off_by_one, TMA=tma,
            PREC=prec, **_launch("token_fwd", token_tile=BLOCK_G * BLOCK_D),
        )
        if side is not None:
            side.join()
            reverse = built[0]
            side.adopt(reverse.pairs, reverse.offsets)
        return o, lse, reverse
    group_pad = next_power_of_2(G)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))

    def chunk_kernel(out, index, out_rows, tuning, out_scale=weights):  # out_scale: read by "o_atomic" only
        n_ranges = 1 if index.token_range == 0 else -(-L // index.token_range)
        launch_ranges = 1 if out_rows == "o" else n_ranges  # "o" rows: one program per chunk over all ranges
        if NC > 0:
            _hsa_fwd_chunk_kernel[(NC, launch_ranges, B * Hk)](
                q, k, v, weights, index.pairs, index.offsets, out, lse, out_scale, qk_scale, L, NC, launch_ranges,
                n_ranges // launch_ranges, 0, Hk, *strides, HK=Hk, G=G, TOPK=K, S=S, D=D, BLOCK_G=group_pad,
                BLOCK_P=_pairs_per_tile(group_pad, tuning + "_rows"), BLOCK_D=BLOCK_D, OFF_BY_ONE=off_by_one,
                OUT_ROWS=out_rows, PREC=prec, **_launch(tuning, BLOCK_D),
            )

    if schedule == "rows":
        if reverse is None or reverse.token_range != TUNING["fwd_p_rows_range"]:
            reverse = build_reverse_index(indices, NC, TUNING["fwd_p_rows_range"])
        # zeros need no fill: invalid slots are masked when read
        rows = empty_output(B, L, Hk, K, G, S, device=q.device, dtype=q.dtype)
        chunk_kernel(rows, reverse, "p", "chunk_fwd_p")
        o = empty_output(*q.shape, device=q.device, dtype=q.dtype)
        v_desc = _rows_descriptor(v, S, BLOCK_D) if tma else None
        _hsa_token_rows_kernel[(L, B * Hk)](
            q, v, v, weights, indices, q, lse, rows, o, v_desc, v_desc, qk_scale, 1.0, L, k.shape[1],
            B * k.shape[1], 0, Hk, *strides, HK=Hk, G=G, TOPK=K, S=S, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D,
            ROWS_IN=True, TMA=tma, PREC=prec, **_launch("token_fwd_rows", token_tile=BLOCK_G * BLOCK_D),
        )
        return o, lse, reverse
    # atomics add in no fixed order: torch.use_deterministic_algorithms(True) (Megatron's --deterministic-mode) keeps
    # the per-slot buffers
    token_range = _fwd_token_range(pass_shape(q, k, indices))
    # One launch over all KV heads: launching head groups with their epilogues (zero-fill, conversion, slot sum)
    # on a side stream, as the backward does, measured slower for the forward (A and C at 64K, session 5).
    if token_range:
        # Pairs add their weighted outputs into an accumulator, token range by token range; the index by token
        # ranges serves the backward too (which takes each chunk's ranges at once)
        if reverse is None or reverse.token_range != token_range:
            reverse = build_reverse_index(indices, NC, token_range)
        acc_dtype = _atomic_accumulator("fwd_atomic_acc", q.dtype, q.numel())
        acc = torch.zeros(q.shape, device=q.device, dtype=acc_dtype)
        if acc_dtype == torch.float32:
            chunk_kernel(acc, reverse, "o_atomic", "chunk_fwd", torch.ones((), device=q.device))
            return acc.to(q.dtype), lse, reverse
        scale = _fp16_accumulator_scale(_output_bound(v, weights))
        chunk_kernel(acc, reverse, "o_atomic", "chunk_fwd", scale)
        return _unscale(acc, scale, q.dtype), lse, reverse
    if reverse is None:
        reverse = build_reverse_index(indices, NC)
    obuf = empty_output(B, L, Hk, K, G, D, device=q.device, dtype=q.dtype)
    chunk_kernel(obuf, reverse, "o", "chunk_fwd")
    o = empty_output(*q.shape, device=q.device, dtype=q.dtype)
    _slot_sum(obuf, indices, o, NC, 0, Hk, G, group_pad, BLOCK_D)
    return o, lse, reverse


# "auto" accumulators are fp16 from this many elements up: below, the half-dozen small launches of the scale cost
# more host time than fp16 saves (the 345M model's layer at 8K, 2**23 elements: backward 1.00 -> 1.28 ms).
FP16_ACCUMULATOR_MIN_ELEMENTS = 2**24


def _atomic_accumulator(key: str, dtype: torch.dtype, elements: int) -> torch.dtype:
    """``TUNING[key]`` ("fwd_atomic_acc" or "bwd_dq_acc") resolved for inputs of ``dtype`` and an accumulator of
    ``elements``: the dtype that pairs add their outputs into with atomics. "auto": fp16 for large bf16 passes (3
    mantissa bits more than the result, half the atomic traffic of fp32), else fp32."""
    mode = TUNING[key]
    if mode not in ("auto", "fp16", "fp32"):
        raise ValueError(f'TUNING["{key}"] must be "auto", "fp16" or "fp32", got {mode!r}')
    if mode == "auto":
        large = elements >= FP16_ACCUMULATOR_MIN_ELEMENTS
        mode = "fp16" if dtype == torch.bfloat16 and large else "fp32"
    return torch.float16 if mode == "fp16" else torch.float32


# An fp16 accumulator holds its sums times a power of two that keeps every partial sum within 2**15 (half of fp16's
# largest finite value) by a bound computed on the device (no host synchronisation). Scaling by a power of two is
# exact, and only values 2**-29 times the bound and below fall among fp16's subnormals.
FP16_ACCUMULATOR_BOUND_EXP = 15


def _fp16_accumulator_scale(bound: torch.Tensor) -> torch.Tensor:
    """The power of two s (fp32 scalar tensor) with s * bound <= 2**15 < 2 * s * bound."""
    return torch.exp2(FP16_ACCUMULATOR_BOUND_EXP - torch.ceil(torch.log2(bound.float().clamp_min(2.0**-100))))


def _max_abs(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, math.inf).float() if x.numel() else torch.zeros((), device=x.device)


def _max_weight_sum(weights: torch.Tensor) -> torch.Tensor:
    """max over (token, KV head) of sum_k |w_k|."""
    if weights.numel() == 0:
        return torch.zeros((), device=weights.device)
    return torch.linalg.vector_norm(weights, 1, dim=-1).amax()


def _output_bound(v: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """|any partial sum over slots of w_k P_k V_k| <= max|V| * max sum_k |w_k| (each softmax row sums to <= 1)."""
    return _max_abs(v) * _max_weight_sum(weights)


def _dq_bound(k, v, weights, do, sm_scale: float) -> torch.Tensor:
    """|any partial sum over slots of scale * dS_k K_k| with dS_k = w_k P_k (dP_k - Delta_k), dP_k = dO V_k^T:
    |dP - Delta| <= 2 max_s |dP_s| <= 2 ||dO row|| max_s ||V_s|| <= 2 D max|dO| max|V|, and the softmax row sums to
    <= 1, so the bound is scale * max|K| * max sum_k |w_k| * 2 D max|dO| max|V|."""
    D = do.shape[-1]
    return sm_scale * 2 * D * _max_abs(k) * _max_weight_sum(weights) * _max_abs(do) * _max_abs(v)


def _unscale(acc: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """acc / scale in ``dtype``, one pass."""
    out = empty_output(*acc.shape, device=acc.device, dtype=dtype)
    block = 4096
    _unscale_kernel[(triton.cdiv(acc.numel(), block),)](acc, out, scale, acc.numel(), BLOCK=block, num_warps=8)
    return out


def _slot_sum(buf, indices, out, num_chunks, h0, nh, G, block_g, block_d):
    """out[:, :, heads of KV heads h0 .. h0+nh-1] = the sum of the per-slot buffer over the valid slots."""
    B, L, Hk, K = indices.shape
    _slot_sum_kernel[(L, B * nh)](
        buf, indices, out, L, num_chunks, h0, nh, out.stride(0), out.stride(1), out.stride(2),
        HK=Hk, G=G, TOPK=K, D=out.shape[-1], BLOCK_G=block_g, BLOCK_D=block_d, **_launch("slot_sum"),
    )


def hsa_attention_backward(q, k, v, weights, indices, do, lse, chunk_size, sm_scale, schedule, reverse=None):
    """Returns ``(dq, dk, dv, dw fp32 [B, L, Hk, K])``."""
    B, L, Hq, D = q.shape
    Hk = k.shape[2]
    G, K, S = Hq // Hk, indices.shape[-1], chunk_size
    NC = k.shape[1] // S
    BLOCK_D = max(16, next_power_of_2(D))
    prec = dot_precision(q.dtype)
    qk_scale = sm_scale * LOG2E
    token_range = _bwd_token_range(pass_shape(q, k, indices), B * Hk * NC)
    split = token_range > 0
    # the forward's index serves unsplit (any token ranges: a chunk's are consecutive) or split by the same ranges
    if reverse is None or (split and reverse.token_range != token_range):
        reverse = build_reverse_index(indices, NC, token_range)
    index_ranges = 1 if reverse.token_range == 0 else -(-L // reverse.token_range)
    n_ranges = index_ranges if split else 1
    # zeros: invalid slots are never visited and their weight gradient is 0
    dw = torch.zeros((B, L, Hk, K), device=q.device, dtype=torch.float32)
    if split:  # fp32 accumulators for the atomic partial sums
        dk = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    else:
        dk = empty_output(*k.shape, device=k.device, dtype=k.dtype)
        dv = empty_output(*v.shape, device=v.device, dtype=v.dtype)
    group_pad = next_power_of_2(G)
    # the unsplit chunk backward writes per-slot dS rows (then the token kernel computes dq) or per-slot dq rows
    ds_rows = schedule != "token" and not split and _bwd_dq_rows(G, S, D) == "ds"
    tuning = "chunk_bwd_ds" if ds_rows else "chunk_bwd"
    block_p = _pairs_per_tile(group_pad, tuning + "_rows")
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2))
    chunk_meta = dict(
        HK=Hk, G=G, TOPK=K, S=S, D=D, BLOCK_G=group_pad, BLOCK_P=block_p, BLOCK_D=BLOCK_D, SPLIT=split, PREC=prec,
        **_launch(tuning, BLOCK_D),
    )

    tma = _tma_loads(k, v, D, BLOCK_D)
    descs = (_rows_descriptor(k, S, BLOCK_D), _rows_descriptor(v, S, BLOCK_D)) if tma else (None, None)
    token_g = max(16, group_pad)

    def chunk_kernel(dq_out, h0, nh, mode, dq_scale=weights):  # dq_scale: read with SPLIT only
        if NC > 0:
            _hsa_bwd_chunk_kernel[(NC, n_ranges, B * nh)](
                q, k, v, weights, do, lse, dw, reverse.pairs, reverse.offsets, dk, dv, dq_out, dq_scale, qk_scale,
                sm_scale, L,
                NC, n_ranges, index_ranges // n_ranges, h0, nh, *strides, DQ_OUT=mode, **chunk_meta,
            )

    def token_kernel(ds, h0, nh):  # ds: per-slot dS rows, or None to recompute dS from q, dO, K, V
        _hsa_token_rows_kernel[(L, B * nh)](
            q, k, v, weights, indices, do, lse, q if ds is None else ds, dq, *descs, qk_scale, sm_scale, L,
            k.shape[1], B * k.shape[1], h0, nh, *strides, HK=Hk, G=G, TOPK=K, S=S, D=D, BLOCK_G=token_g,
            BLOCK_D=BLOCK_D, ROWS_IN=ds is not None, TMA=tma, PREC=prec,
            **_launch("token_bwd", token_tile=token_g * BLOCK_D),
        )

    if schedule == "token":  # dq by the token kernel from the gathered K/V; dK/dV and dw by the chunk kernel
        dq = empty_output(*q.shape, device=q.device, dtype=q.dtype)
        chunk_kernel(dq, 0, Hk, "none")
        token_kernel(None, 0, Hk)
    elif split:  # every pair adds its dq into an accumulator (Q's strides): no per-slot buffer
        acc_dtype = _atomic_accumulator("bwd_dq_acc", q.dtype, q.numel())
        dq_acc = torch.zeros(q.shape, device=q.device, dtype=acc_dtype)
        if acc_dtype == torch.float32:
            chunk_kernel(dq_acc, 0, Hk, "dq", torch.ones((), device=q.device))
            dq = dq_acc.to(q.dtype)
        else:
            scale = _fp16_accumulator_scale(_dq_bound(k, v, weights, do, sm_scale))
            chunk_kernel(dq_acc, 0, Hk, "dq", scale)
            dq = _unscale(dq_acc, scale, q.dtype)
    else:
        # Per-slot rows, head group by head group; each group's second step runs on the side stream beside the next
        # group's chunk kernel. "dq": per-slot dq rows, summed over the slots; "ds": per-slot dS rows, which the token
        # kernel multiplies by the gathered K chunks (half the rows' bytes when S < D, one MMA less per pair here)
        dq = empty_output(*q.shape, device=q.device, dtype=q.dtype)
        width = S if ds_rows else D
        buf = empty_output(B, L, Hk, K, G, width, device=q.device, dtype=q.dtype)
        # measured: head groups gain nothing with dS rows (A at 64K: 28.96 ms in one group, 29.1-29.2 in four)
        groups = [(0, Hk)] if ds_rows else _head_groups(q.device, Hk, B * NC, G)
        side = _SideStream(q.device, enabled=len(groups) > 1)
        for h0, nh in groups:
            chunk_kernel(buf, h0, nh, "ds" if ds_rows else "dq")
            if ds_rows:
                side.run(lambda h0=h0, nh=nh: token_kernel(buf, h0, nh))
            else:
                side.run(lambda h0=h0, nh=nh: _slot_sum(buf, indices, dq, NC, h0, nh, G, group_pad, BLOCK_D))
        side.join()
    if NC == 0:
        dk.zero_()
        dv.zero_()
    if split:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv, dw


class HSAAttentionFunction(torch.autograd.Function):
    """Autograd op over the Triton kernels; see ``megatron_ext.kernels.hsa.hsa_attention`` for the contract."""

    @staticmethod
    def forward(
        ctx, q, k, v, weights, indices, chunk_size, sm_scale, off_by_one, fwd_schedule, bwd_schedule, for_backward
    ):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        w32 = weights.contiguous().float()
        idx = indices.contiguous().to(torch.int32)
        o, lse, reverse = hsa_attention_forward(
            q, k, v, w32, idx, chunk_size, sm_scale, off_by_one, fwd_schedule,
            for_backward=for_backward,
        )
        ctx.save_for_backward(q, k, v, w32, idx, lse, *((None, None) if reverse is None else reverse[:2]))
        ctx.token_range = None if reverse is None else reverse.token_range
        ctx.config = (chunk_size, sm_scale, bwd_schedule)
        ctx.weights_dtype = weights.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, w32, idx, lse, pairs, offsets = ctx.saved_tensors
        chunk_size, sm_scale, schedule = ctx.config
        reverse = None if ctx.token_range is None else ReverseIndex(pairs, offsets, ctx.token_range)
        dq, dk, dv, dw = hsa_attention_backward(
            q, k, v, w32, idx, do.contiguous(), lse, chunk_size, sm_scale, schedule, reverse
        )
        return dq, dk, dv, dw.to(ctx.weights_dtype), None, None, None, None, None, None, None
