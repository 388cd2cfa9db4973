"""Triton kernels for GCA training: forward, backward dQ (+ dW), backward dK/dV.

Tiling. All S tokens of a query chunk share one selection, so a query tile is dense: its rows are the flattened
(token, query head of the KV group) pairs of one query chunk, R = S * G rows, cut into BLOCK_M-row tiles, and each
selected chunk is one whole [S, D] K/V tile. Every slot is a full `tl.dot` on both sides, with no mask inside a
chunk (retrieved chunks lie wholly in the past).

- forward, grid (chunks x row tiles, B x Hk): loops over the K slots; one softmax per slot (a chunk is a single
  block, so no online rescaling), the output accumulates w_k * P_k V_k; the per-slot log-sum-exp (base 2) is saved.
- backward dQ, same grid: recomputes P_k and dP_k = dO V_k^T, gets Delta_k = rowsum(P_k * dP_k) = <O_k, dO>, and
  accumulates dQ; the row sums of Delta_k are the weight gradient, written per tile and summed in PyTorch.
- backward dK/dV, grid (KV chunks, B x Hk), KV-centric: every KV chunk visits only the (query chunk, slot) pairs
  that selected it, through a reverse index (CSR) built in PyTorch; it sees the whole softmax row of each pair
  (the chunk is the row), so it recomputes Delta_k itself and needs no atomics.
- `GCA_BWD=fused` swaps the two backward kernels for one KV-centric kernel that also adds dQ with fp32 atomics
  (5 matmuls per pair instead of 7); on an H100 it measured 1.5x slower than the split pair, so it is not the default.

Row r of a tile: token c*S + r // G, query head h*G + r % G. LSE layout: [B*Hk, C, K, R] fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..utils import dot_precision, interpreter_enabled, segment_offsets

LOG2E = 1.4426950408889634
MIN_BLOCK_M = 16


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_rows(c, tile, seq_len, h, CHUNK: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of one query tile: flat index within the chunk, token position, query head, and the in-bounds mask."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = c * CHUNK + rows // GROUP
    head = h * GROUP + rows % GROUP
    row_ok = (rows < CHUNK * GROUP) & (tok < seq_len)
    return rows, tok, head, row_ok


@triton.jit
def _chunk_rows(e, kv_len, CHUNK: tl.constexpr, NULL_SLOT: tl.constexpr):
    """Rows of KV chunk e: position, whether the row exists, whether its K/V are read (not the null slot)."""
    j = tl.arange(0, CHUNK)
    # an index past the memory is an empty slot; clamped first, so that e * CHUNK cannot wrap around int32
    e = tl.minimum(e, (kv_len + CHUNK - 1) // CHUNK)
    kv_row = e * CHUNK + j
    exists = kv_row < kv_len
    if NULL_SLOT:
        read = exists & (j != CHUNK - 1)
    else:
        read = exists
    return kv_row, exists, read


@triton.jit
def _gca_fwd_kernel(
    Q, K, V, W, IDX, O, LSE,
    seq_len, kv_len, num_q_chunks,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    qk_scale,
    NUM_SLOTS: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr, ROWS: tl.constexpr,
    OFF_BY_ONE: tl.constexpr, NULL_SLOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    c = pid_m // TILES
    tile = pid_m % TILES
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS

    rows, tok, head, row_ok = _tile_rows(c, tile, seq_len, h, CHUNK, GROUP, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_off = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    sel = (b * num_q_chunks + c) * NUM_SLOTS
    lse_ptr = LSE + ((pid_bh * num_q_chunks + c) * NUM_SLOTS).to(tl.int64) * ROWS + rows
    kv_base = b.to(tl.int64) * stride_kb + h * stride_kh
    for s in range(NUM_SLOTS):
        e = tl.load(IDX + sel + s)
        w = tl.load(W + sel + s)
        w = tl.where(e >= 0, w, 0.0)
        kv_row, exists, read = _chunk_rows(tl.maximum(e, 0), kv_len, CHUNK, NULL_SLOT)
        kv_off = kv_base + kv_row.to(tl.int64) * stride_kt
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # base-2 logits
        scores = tl.where(exists[None, :], scores, float("-inf"))
        m = tl.max(scores, 1)
        if OFF_BY_ONE:
            m = tl.maximum(m, 0.0)  # the null logit 0 takes part in the max
        m = tl.where(m == float("-inf"), 0.0, m)  # a chunk with no rows: p = 0 below, no NaN
        p = tl.exp2(scores - m[:, None])
        denom = tl.sum(p, 1)
        if OFF_BY_ONE:
            denom += tl.exp2(-m)
        denom = tl.where(denom == 0.0, 1.0, denom)
        # Stage 2 folded into stage 1: the slot weight scales the normalised probabilities.
        acc += tl.dot((p * (w / denom)[:, None]).to(v.dtype), v, input_precision=DOT_PRECISION)
        tl.store(lse_ptr + s * ROWS, m + tl.log2(denom), mask=rows < ROWS)
    tl.store(O + q_off[:, None] + d[None, :], acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _gca_bwd_dq_kernel(
    Q, K, V, W, IDX, DO, LSE, DQ, DW_PART,
    seq_len, kv_len, num_q_chunks,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    sm_scale, qk_scale,
    NUM_SLOTS: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr, ROWS: tl.constexpr, DW_COLS: tl.constexpr,
    NULL_SLOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    c = pid_m // TILES
    tile = pid_m % TILES
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS

    rows, tok, head, row_ok = _tile_rows(c, tile, seq_len, h, CHUNK, GROUP, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_off = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    sel = (b * num_q_chunks + c) * NUM_SLOTS
    lse_ptr = LSE + ((pid_bh * num_q_chunks + c) * NUM_SLOTS).to(tl.int64) * ROWS + rows
    kv_base = b.to(tl.int64) * stride_kb + h * stride_kh
    for s in range(NUM_SLOTS):
        e = tl.load(IDX + sel + s)
        w = tl.load(W + sel + s)
        valid = e >= 0
        w = tl.where(valid, w, 0.0)
        kv_row, exists, read = _chunk_rows(tl.maximum(e, 0), kv_len, CHUNK, NULL_SLOT)
        kv_off = kv_base + kv_row.to(tl.int64) * stride_kt
        k = tl.load(K + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
        v = tl.load(V + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
        lse = tl.load(lse_ptr + s * ROWS, mask=rows < ROWS, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(scores - lse[:, None])
        p = tl.where(exists[None, :] & row_ok[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        delta = tl.sum(p * dp, 1)  # <O_k, dO> per row, O_k the unweighted per-chunk output
        ds = p * (dp - delta[:, None]) * w
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        dw = tl.where(valid, tl.sum(delta, 0), 0.0)
        tl.store(DW_PART + (sel + s).to(tl.int64) * DW_COLS + h * TILES + tile, dw)
    tl.store(DQ + q_off[:, None] + d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _gca_bwd_dkdv_kernel(
    Q, K, V, W, DO, LSE, DK, DV, REV_OFFSETS, REV_ENTRIES, DQ_ACC, DW_PART,
    seq_len, kv_len, num_q_chunks, num_kv_chunks,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    sm_scale, qk_scale,
    NUM_SLOTS: tl.constexpr, CHUNK: tl.constexpr, GROUP: tl.constexpr, NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr, ROWS: tl.constexpr,
    DW_COLS: tl.constexpr, FUSED_DQ: tl.constexpr, NULL_SLOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK, dV of one KV chunk; with FUSED_DQ also dQ (fp32 atomics into DQ_ACC) and the weight gradient, so that
    the dQ kernel is not needed."""
    e = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_KV_HEADS
    h = pid_bh % NUM_KV_HEADS

    d = tl.arange(0, HEAD_DIM)
    kv_row, exists, read = _chunk_rows(e, kv_len, CHUNK, NULL_SLOT)
    kv_off = b.to(tl.int64) * stride_kb + h * stride_kh + kv_row.to(tl.int64) * stride_kt
    k = tl.load(K + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
    v = tl.load(V + kv_off[:, None] + d[None, :], mask=read[:, None], other=0.0)
    dk = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([CHUNK, HEAD_DIM], dtype=tl.float32)

    start = tl.load(REV_OFFSETS + b * num_kv_chunks + e)
    end = tl.load(REV_OFFSETS + b * num_kv_chunks + e + 1)
    # One flat loop over (selecting pair, row tile), so that the compiler pipelines the loads across pairs.
    for it in range(start * TILES, end * TILES):
        n = it // TILES
        tile = it % TILES
        entry = tl.load(REV_ENTRIES + n)  # c * NUM_SLOTS + slot, within batch b
        c = entry // NUM_SLOTS
        s = entry % NUM_SLOTS
        w = tl.load(W + b * num_q_chunks * NUM_SLOTS + entry)
        lse_base = LSE + ((pid_bh * num_q_chunks + c) * NUM_SLOTS + s).to(tl.int64) * ROWS
        rows, tok, head, row_ok = _tile_rows(c, tile, seq_len, h, CHUNK, GROUP, BLOCK_M)
        q_off = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qt + head * stride_qh
        q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=rows < ROWS, other=0.0)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [CHUNK, BLOCK_M]
        p_t = tl.exp2(scores_t - lse[None, :])
        p_t = tl.where(exists[:, None] & row_ok[None, :], p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        delta = tl.sum(p_t * dp_t, 0)  # the whole softmax row lies in this chunk
        ds_t = p_t * (dp_t - delta[None, :]) * w
        dv += tl.dot((p_t * w).to(do.dtype), do, input_precision=DOT_PRECISION)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        if FUSED_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(DQ_ACC + q_off[:, None] + d[None, :], dq, mask=row_ok[:, None], sem="relaxed")
            dw_off = (b * num_q_chunks * NUM_SLOTS + entry).to(tl.int64) * DW_COLS + h * TILES + tile
            tl.store(DW_PART + dw_off, tl.sum(delta, 0))
    # The null slot's K/V never enter the forward: their gradient is zero.
    dk = tl.where(read[:, None], dk * sm_scale, 0.0)
    dv = tl.where(read[:, None], dv, 0.0)
    tl.store(DK + kv_off[:, None] + d[None, :], dk.to(DK.dtype.element_ty), mask=exists[:, None])
    tl.store(DV + kv_off[:, None] + d[None, :], dv.to(DV.dtype.element_ty), mask=exists[:, None])


# --------------------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------------------


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def launch_config(kernel: str, chunk_size: int, group: int, head_dim: int) -> dict:
    """BLOCK_M / num_warps / num_stages of one kernel ("fwd", "dq", "dkdv") for a shape.

    Overridable for tuning sweeps with GCA_<KERNEL>_CONFIG="BLOCK_M,num_warps,num_stages" (benchmarks only).
    """
    env = os.environ.get(f"GCA_{kernel.upper()}_CONFIG")
    rows = chunk_size * group
    if env:
        bm, warps, stages = (int(x) for x in env.split(","))
        return dict(BLOCK_M=max(MIN_BLOCK_M, min(bm, _pow2_at_most(rows))), num_warps=warps, num_stages=stages)
    # Defaults measured on an H100 (benchmarks/results/gca.md, run 1: S 64, D 128): 64-row tiles and 4 warps win
    # for all three kernels. The 128 x 128 chunk tiles of S = D = 128 take 8 warps in dK/dV (register pressure).
    if kernel == "fwd":
        bm, warps, stages = 64, 4, 3
    elif kernel == "dq":
        bm, warps, stages = 64, 4, 2
    elif kernel == "dkdv":
        bm, warps, stages = (64, 4, 2) if chunk_size * head_dim <= 64 * 128 else (32, 8, 2)
    else:
        raise ValueError(f"unknown kernel {kernel!r}")
    return dict(BLOCK_M=max(MIN_BLOCK_M, min(bm, _pow2_at_most(rows))), num_warps=warps, num_stages=stages)


def _launch_options(cfg: dict) -> dict:
    if interpreter_enabled():
        return {}
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def reverse_index(indices: torch.Tensor, num_kv_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR from KV chunk to the (query chunk, slot) pairs that selected it, per batch element, on device.

    indices: [B, Cq, K] int32 (-1 = empty). Returns offsets [B * num_kv_chunks + 1] int32 and entries int32 whose
    range offsets[b*Ckv + e] : offsets[b*Ckv + e + 1] lists c*K + slot for every (c, slot) of batch b selecting e,
    in increasing query-chunk order.
    """
    B, Cq, K = indices.shape
    idx = indices.to(torch.int32)
    valid = (idx >= 0) & (idx < num_kv_chunks)
    batch = torch.arange(B, device=idx.device, dtype=torch.int32)[:, None, None]
    sentinel = B * num_kv_chunks
    keys = torch.where(valid, batch * num_kv_chunks + idx, torch.full_like(idx, sentinel)).view(-1)
    sorted_keys, order = torch.sort(keys, stable=True)
    offsets = segment_offsets(sorted_keys, sentinel)
    entries = (order % (Cq * K)).to(torch.int32)
    return offsets, entries


# --------------------------------------------------------------------------------------------------------------
# host wrappers
# --------------------------------------------------------------------------------------------------------------


def _common(q, k, chunk_size):
    B, L, Hq, D = q.shape
    Lkv, Hk = k.shape[1], k.shape[2]
    return B, L, Hq, D, Lkv, Hk, Hq // Hk, -(-L // chunk_size), -(-Lkv // chunk_size)


def gca_attention_forward(q, k, v, weights, indices, *, chunk_size, sm_scale, softmax_off_by_one, landmark_null_slot):
    """q [B,L,Hq,D], k/v [B,Lkv,Hk,D] contiguous; weights fp32 / indices int32 [B,Cq,K] contiguous.
    Returns (o [B,L,Hq,D], lse [B*Hk, Cq, K, S*G] fp32, base 2)."""
    B, L, Hq, D, Lkv, Hk, G, Cq, _ = _common(q, k, chunk_size)
    K = indices.shape[-1]
    rows = chunk_size * G
    o = torch.empty_like(q)
    lse = torch.empty((B * Hk, Cq, K, rows), device=q.device, dtype=torch.float32)
    cfg = launch_config("fwd", chunk_size, G, D)
    tiles = -(-rows // cfg["BLOCK_M"])
    _gca_fwd_kernel[(Cq * tiles, B * Hk)](
        q, k, v, weights, indices, o, lse,
        L, Lkv, Cq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        sm_scale * LOG2E,
        NUM_SLOTS=K, CHUNK=chunk_size, GROUP=G, NUM_KV_HEADS=Hk, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"],
        TILES=-(-rows // cfg["BLOCK_M"]), ROWS=rows,
        OFF_BY_ONE=softmax_off_by_one, NULL_SLOT=landmark_null_slot, DOT_PRECISION=dot_precision(q.dtype),
        **_launch_options(cfg),
    )
    return o, lse


def backward_schedule() -> str:
    """"split": a query-centric dQ/dW kernel plus a KV-centric dK/dV kernel (deterministic, the default);
    "fused": one KV-centric kernel that also adds dQ with fp32 atomics. GCA_BWD overrides (benchmarks)."""
    schedule = os.environ.get("GCA_BWD", "split")
    if schedule not in ("split", "fused"):
        raise ValueError(f"GCA_BWD must be 'split' or 'fused', got {schedule!r}")
    return schedule


def gca_attention_backward(
    do, q, k, v, weights, indices, lse, *, chunk_size, sm_scale, softmax_off_by_one, landmark_null_slot,
    only: str | None = None,
):
    """Gradients (dq, dk, dv, dw fp32 [B,Cq,K]). The off-by-one option needs no term of its own: the null logit is
    part of the saved LSE, and its value is zero. `only` ("dq" or "dkdv") runs one kernel, for tuning."""
    del softmax_off_by_one
    B, L, Hq, D, Lkv, Hk, G, Cq, Ckv = _common(q, k, chunk_size)
    K = indices.shape[-1]
    rows = chunk_size * G
    prec = dot_precision(q.dtype)
    qk_scale = sm_scale * LOG2E
    fused = backward_schedule() == "fused"
    dq = dw = dk = dv = None

    if not fused and only in (None, "dq"):
        dq, dw = _backward_dq(do, q, k, v, weights, indices, lse, chunk_size, sm_scale, landmark_null_slot)
    if only in (None, "dkdv"):
        cfg = launch_config("dkdv", chunk_size, G, D)
        tiles = -(-rows // cfg["BLOCK_M"])
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        if fused:
            dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
            dw_part = torch.zeros((B, Cq, K, Hk * tiles), device=q.device, dtype=torch.float32)
        else:
            dq_acc = dw_part = dk  # unused placeholders
        offsets, entries = reverse_index(indices, Ckv)
        _gca_bwd_dkdv_kernel[(Ckv, B * Hk)](
            q, k, v, weights, do, lse, dk, dv, offsets, entries, dq_acc, dw_part,
            L, Lkv, Cq, Ckv,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            sm_scale, qk_scale,
            NUM_SLOTS=K, CHUNK=chunk_size, GROUP=G, NUM_KV_HEADS=Hk, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"],
            TILES=tiles, ROWS=rows, DW_COLS=Hk * tiles, FUSED_DQ=fused,
            NULL_SLOT=landmark_null_slot, DOT_PRECISION=prec,
            **_launch_options(cfg),
        )
        if fused:
            dq, dw = dq_acc.to(q.dtype), dw_part.sum(-1)
    return dq, dk, dv, dw


def _backward_dq(do, q, k, v, weights, indices, lse, chunk_size, sm_scale, landmark_null_slot):
    B, L, Hq, D, Lkv, Hk, G, Cq, Ckv = _common(q, k, chunk_size)
    K = indices.shape[-1]
    rows = chunk_size * G
    dq = torch.empty_like(q)
    cfg = launch_config("dq", chunk_size, G, D)
    tiles = -(-rows // cfg["BLOCK_M"])
    dw_cols = Hk * tiles
    dw_part = torch.empty((B, Cq, K, dw_cols), device=q.device, dtype=torch.float32)
    _gca_bwd_dq_kernel[(Cq * tiles, B * Hk)](
        q, k, v, weights, indices, do, lse, dq, dw_part,
        L, Lkv, Cq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        sm_scale, sm_scale * LOG2E,
        NUM_SLOTS=K, CHUNK=chunk_size, GROUP=G, NUM_KV_HEADS=Hk, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"],
        TILES=tiles, ROWS=rows, DW_COLS=dw_cols, NULL_SLOT=landmark_null_slot, DOT_PRECISION=dot_precision(q.dtype),
        **_launch_options(cfg),
    )
    return dq, dw_part.sum(-1)


def attention_flops(seq_len: int, num_q_heads: int, head_dim: int, chunk_size: int, topk: int) -> float:
    """Forward matmul FLOPs of GCA when every slot is valid: 4 * L * Hq * K * S * D (backward = 2.5x)."""
    return 4.0 * seq_len * num_q_heads * topk * chunk_size * head_dim


__all__ = ["attention_flops", "gca_attention_backward", "gca_attention_forward", "launch_config", "reverse_index"]
