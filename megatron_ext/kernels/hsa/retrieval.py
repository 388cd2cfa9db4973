"""HSA retrieval in Triton: landmark scoring, causal eligibility and a streaming top-k, then the weights.

The kernel gives each program a block of BLOCK_T tokens of one (batch, retrieval head). It walks the eligible chunks in
blocks of BLOCK_C, scores them with one MMA per block, and merges them into a running top-k held in registers: while
some row has a candidate above its current k-th best, every such row swaps its best candidate in for its worst kept
chunk, then sorts what it kept most recent first. No [L, C] score matrix ever exists, so memory is linear in L.

The weights (softmax or stick-breaking over the selected scores, with a rank decay) are one more kernel forward and
backward (``ChunkWeights``; the oracle is ``reference.chunk_weights``): in PyTorch they were about fifteen element-wise
launches on [B, L, R, K], whose launch overhead exceeded the top-k kernel's own time at 64K tokens (config B).
Gradients reach q_r and the landmarks through the selected scores (``SelectedScores``), whose backward scatters the
score gradients into [token block, C] tiles and runs two matmuls per block: memory O(block * C), linear in L.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megatron_ext.kernels.hsa.reference import WEIGHT_RULES, chunk_weights, doc_start_chunks
from megatron_ext.kernels.utils import dot_precision, empty_output, interpreter_enabled, next_power_of_2

__all__ = ["retrieval_triton", "topk_chunks", "SelectedScores", "ChunkWeights"]

# Score-gradient tiles hold at most this many fp32 elements ([B, token block, R, C]).
GRAD_TILE_ELEMENTS = 1 << 24


def _topk_configs():
    """Tile shapes to try: small token blocks keep the serial top-k loop short (few rows compete per swap), larger
    ones score more chunks per MMA. The interpreter gets one small config (no timing)."""
    if interpreter_enabled():
        return [triton.Config({"BLOCK_T": 16, "BLOCK_C": 16}, num_warps=4)]
    shapes = [(64, 64, 4), (64, 32, 4), (32, 32, 4), (32, 32, 2), (32, 16, 2), (16, 32, 1), (16, 16, 1)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_C": c}, num_warps=w, num_stages=1) for t, c, w in shapes]


@triton.autotune(configs=_topk_configs(), key=["L", "C", "R", "DR", "TOPK"])
@triton.jit
def _topk_chunks_kernel(
    QR, LMK, LO, IDX_OUT, SCORE_OUT,
    scale, L, C, seed,
    s_qb, s_ql, s_qr, s_lb, s_lc, s_lr,
    R: tl.constexpr, DR: tl.constexpr, S: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DR: tl.constexpr,
    HAS_LO: tl.constexpr, GUMBEL: tl.constexpr, PREC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    br = tl.program_id(1)
    b = br // R
    r = br % R
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < L
    hi = tl.where(t_mask, tl.minimum(offs_t // S, C), 0)  # eligible chunks: lo <= c < hi
    if HAS_LO:
        lo = tl.load(LO + offs_t, mask=t_mask, other=0)
    else:
        lo = tl.zeros([BLOCK_T], dtype=tl.int32)
    c_begin = tl.min(tl.where(t_mask, lo, C), 0)
    c_end = tl.max(hi, 0)
    offs_k = tl.arange(0, KP)
    offs_cb = tl.arange(0, BLOCK_C)
    inf = float("inf")
    # Kept candidates: ranking value (noisy with Gumbel), clean score (with Gumbel only), chunk index. Padding slots
    # (>= TOPK) hold +inf so they are never the worst kept chunk.
    top_v = tl.where(offs_k[None, :] < TOPK, -inf, inf) + tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    top_s = tl.zeros([BLOCK_T, KP], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, KP], dtype=tl.int32) - 1
    thr, worst = tl.min(top_v, 1, return_indices=True)  # current k-th best ranking value and its slot
    q_base = QR + b.to(tl.int64) * s_qb + r * s_qr
    l_base = LMK + b.to(tl.int64) * s_lb + r * s_lr
    for c0 in range(c_begin, c_end, BLOCK_C):
        offs_c = c0 + offs_cb
        scores = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for d0 in tl.static_range(0, DR, BLOCK_DR):
            offs_d = d0 + tl.arange(0, BLOCK_DR)
            d_mask = offs_d < DR
            qt = tl.load(q_base + offs_t[:, None].to(tl.int64) * s_ql + offs_d[None, :],
                         mask=t_mask[:, None] & d_mask[None, :], other=0.0)
            lt = tl.load(l_base + offs_c[:, None].to(tl.int64) * s_lc + offs_d[None, :],
                         mask=(offs_c < C)[:, None] & d_mask[None, :], other=0.0)
            scores += tl.dot(qt, tl.trans(lt), input_precision=PREC)
        eligible = (offs_c[None, :] >= lo[:, None]) & (offs_c[None, :] < hi[:, None])
        clean = tl.where(eligible, scores * scale, -inf)
        if GUMBEL:
            u = tl.rand(seed + br, offs_t[:, None] * C + offs_c[None, :])
            u = tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-7)
            ranked = clean - tl.log(-tl.log(u))
        else:
            ranked = clean
        # Every row swaps its best remaining candidate for its worst kept chunk until no row has a candidate above
        # its k-th best: two row reductions per round (best candidate, new worst kept) and one across rows.
        cand = tl.where(ranked > thr[:, None], ranked, -inf)
        best, best_j = tl.max(cand, 1, return_indices=True)
        while tl.max(best, 0) > -inf:
            replace = (best > thr)[:, None] & (offs_k[None, :] == worst[:, None])
            hit = offs_cb[None, :] == best_j[:, None]
            top_v = tl.where(replace, best[:, None], top_v)
            top_i = tl.where(replace, (c0 + best_j)[:, None], top_i)
            if GUMBEL:
                top_s = tl.where(replace, tl.sum(tl.where(hit, clean, 0.0), 1)[:, None], top_s)
            thr, worst = tl.min(top_v, 1, return_indices=True)
            cand = tl.where(hit | (cand <= thr[:, None]), -inf, cand)
            best, best_j = tl.max(cand, 1, return_indices=True)
    if not GUMBEL:
        top_s = tl.where(top_i >= 0, top_v, 0.0)
    # Most recent first: sort (index, score bits) packed in int64 by index, descending (no slot is -1 twice with a
    # different score, and -1 slots, invalid or padding, sort last).
    packed = (top_i.to(tl.int64) << 32) | top_s.to(tl.uint32, bitcast=True).to(tl.int64)
    packed = tl.sort(packed, dim=1, descending=True)
    top_i = (packed >> 32).to(tl.int32)
    top_s = (packed & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    out = ((b.to(tl.int64) * L + offs_t[:, None]) * R + r) * TOPK + offs_k[None, :]
    out_mask = t_mask[:, None] & (offs_k[None, :] < TOPK)
    tl.store(IDX_OUT + out, top_i, mask=out_mask)
    tl.store(SCORE_OUT + out, top_s, mask=out_mask)


def topk_chunks(q_r, landmarks, *, chunk_size, topk, gumbel=False, cu_seqlens=None, seed=None):
    """Top-k eligible chunks, most recent first: ``(indices int32 [B, L, R, K] (-1 = none, last), clean scores
    fp32)``."""
    B, L, R, Dr = q_r.shape
    C = landmarks.shape[1]
    q_r, landmarks = q_r.contiguous(), landmarks.contiguous()
    idx = empty_output(B, L, R, topk, device=q_r.device, dtype=torch.int32)
    scores = empty_output(B, L, R, topk, device=q_r.device, dtype=torch.float32)
    lo = None
    if cu_seqlens is not None:
        lo = doc_start_chunks(cu_seqlens, L, chunk_size, q_r.device).to(torch.int32)
    if gumbel and seed is None:
        seed = int(torch.randint(0, 2**30, (1,)).item())
    block_dr = min(64, max(16, next_power_of_2(Dr)))

    def grid(meta):
        return (triton.cdiv(L, meta["BLOCK_T"]), B * R)

    _topk_chunks_kernel[grid](
        q_r, landmarks, lo if lo is not None else idx, idx, scores,
        1.0 / math.sqrt(Dr), L, C, int(seed or 0),
        q_r.stride(0), q_r.stride(1), q_r.stride(2), landmarks.stride(0), landmarks.stride(1), landmarks.stride(2),
        R=R, DR=Dr, S=chunk_size, TOPK=topk, KP=max(2, next_power_of_2(topk)),
        BLOCK_DR=block_dr, HAS_LO=lo is not None, GUMBEL=bool(gumbel), PREC=dot_precision(q_r.dtype),
    )
    return idx, scores


class SelectedScores(torch.autograd.Function):
    """The scores of the selected chunks as a differentiable function of q_r and the landmarks.

    forward(q_r [B, L, R, Dr], landmarks [B, C, R, Dr], indices [B, L, R, K], scores fp32 [B, L, R, K]) returns the
    precomputed ``scores``; backward gives dq_r[t] = scale * sum_k ds[t, k] lmk[idx[t, k]] and
    dlmk[c] = scale * sum_{(t, k): idx = c} ds[t, k] q_r[t], through [token block, C] tiles.
    """

    @staticmethod
    def forward(ctx, q_r, landmarks, indices, scores):
        ctx.save_for_backward(q_r, landmarks, indices)
        return scores

    @staticmethod
    def backward(ctx, d_scores):
        q_r, landmarks, indices = ctx.saved_tensors
        B, L, R, Dr = q_r.shape
        C = landmarks.shape[1]
        scale = 1.0 / math.sqrt(Dr)
        dq = torch.zeros(B, L, R, Dr, device=q_r.device, dtype=torch.float32)
        dl = torch.zeros(B, C, R, Dr, device=q_r.device, dtype=torch.float32)
        if C > 0:
            valid = indices >= 0
            ds = torch.where(valid, d_scores.float(), torch.zeros_like(d_scores, dtype=torch.float32)) * scale
            block = max(1, min(L, GRAD_TILE_ELEMENTS // max(1, B * R * C)))
            for t0 in range(0, L, block):
                t1 = min(L, t0 + block)
                tile = torch.zeros(B, t1 - t0, R, C, device=q_r.device, dtype=torch.float32)
                tile.scatter_add_(-1, indices[:, t0:t1].long().clamp(min=0), ds[:, t0:t1])
                # Tensor-core matmuls in the inputs' dtype (fp32 accumulation), as attention backwards multiply dS:
                # in fp32 they ran on CUDA cores (H100, 345M model, 4 x 8K tokens: 0.6 ms per retrieval backward).
                tile = tile.to(q_r.dtype)
                dq[:, t0:t1] = torch.einsum("btrc,bcrd->btrd", tile, landmarks.to(q_r.dtype))
                dl += torch.einsum("btrc,btrd->bcrd", tile, q_r[:, t0:t1]).float()
        return dq.to(q_r.dtype), dl.to(landmarks.dtype), None, None


@triton.jit
def _weights_logits(SCORES, IDX, decay, rows, n_rows, TOPK: tl.constexpr, KP: tl.constexpr):
    """(logits s_k + k*decay, valid mask, offsets) of a block of rows [BLOCK_N, KP]."""
    offs_k = tl.arange(0, KP)
    off = rows[:, None].to(tl.int64) * TOPK + offs_k[None, :]
    in_bounds = (rows[:, None] < n_rows) & (offs_k[None, :] < TOPK)
    valid = in_bounds & (tl.load(IDX + off, mask=in_bounds, other=-1) >= 0)
    logits = tl.load(SCORES + off, mask=valid, other=0.0) + offs_k[None, :].to(tl.float32) * decay
    return tl.where(valid, logits, 0.0), valid, off, in_bounds


@triton.jit
def _chunk_weights_fwd_kernel(
    SCORES, IDX, DECAY, W, n_rows, decay_value,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, STICK_BREAKING: tl.constexpr,
    DECAY_PTR: tl.constexpr,
):
    """Weights of BLOCK_N rows (one (token, retrieval head) each): softmax over the valid slots, or stick-breaking
    w_k = exp(x_k - sum_{j<=k, valid} softplus(x_j)); 0 in invalid slots."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    decay = tl.load(DECAY).to(tl.float32) if DECAY_PTR else decay_value
    x, valid, off, in_bounds = _weights_logits(SCORES, IDX, decay, rows, n_rows, TOPK, KP)
    if STICK_BREAKING:
        softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
        w = tl.exp(x - tl.cumsum(tl.where(valid, softplus, 0.0), 1))
    else:
        m = tl.max(tl.where(valid, x, -float("inf")), 1)
        e = tl.exp(x - tl.where(m > -float("inf"), m, 0.0)[:, None])
        e = tl.where(valid, e, 0.0)
        denom = tl.sum(e, 1)
        w = e / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(W + off, tl.where(valid, w, 0.0), mask=in_bounds)


@triton.jit
def _chunk_weights_bwd_kernel(
    SCORES, IDX, DECAY, W, DW, DS, DDECAY, n_rows, decay_value,
    TOPK: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, STICK_BREAKING: tl.constexpr,
    DECAY_PTR: tl.constexpr,
):
    """Score gradients of BLOCK_N rows, and the block's part of the rank-decay gradient (sum of k * dx_k):
    softmax dx = w * (dw - sum_k w_k dw_k); stick-breaking dx_j = w_j dw_j - sigma(x_j) sum_{k>=j} w_k dw_k."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    decay = tl.load(DECAY).to(tl.float32) if DECAY_PTR else decay_value
    x, valid, off, in_bounds = _weights_logits(SCORES, IDX, decay, rows, n_rows, TOPK, KP)
    w = tl.load(W + off, mask=valid, other=0.0)
    wdw = w * tl.load(DW + off, mask=valid, other=0.0)
    if STICK_BREAKING:
        # sum over k >= j: the row total minus the exclusive prefix sum
        suffix = tl.sum(wdw, 1)[:, None] - tl.cumsum(wdw, 1) + wdw
        dx = wdw - tl.sigmoid(x) * suffix
    else:
        dx = wdw - w * tl.sum(wdw, 1)[:, None]
    dx = tl.where(valid, dx, 0.0)
    tl.store(DS + off, dx, mask=in_bounds)
    ranks = tl.arange(0, KP).to(tl.float32)
    tl.store(DDECAY + pid, tl.sum(tl.sum(dx * ranks[None, :], 1), 0))


class ChunkWeights(torch.autograd.Function):
    """``reference.chunk_weights`` as one kernel each way: fp32 weights [..., K] from the selected scores (fp32) and
    the indices (-1 = invalid slot); gradients to the scores and to a tensor rank decay."""

    BLOCK_N = 128

    @staticmethod
    def forward(ctx, scores, indices, weight_rule, rank_decay):
        if weight_rule not in WEIGHT_RULES:
            raise ValueError(f"weight_rule must be one of {WEIGHT_RULES}, got {weight_rule!r}")
        scores, indices = scores.float().contiguous(), indices.contiguous()
        K = scores.shape[-1]
        n_rows = scores.numel() // max(K, 1)
        decay_ptr = torch.is_tensor(rank_decay)
        decay = rank_decay.detach().float().reshape(1) if decay_ptr else scores
        decay_value = 0.0 if decay_ptr or rank_decay is None else float(rank_decay)
        w = torch.empty_like(scores)
        meta = dict(TOPK=K, KP=max(2, next_power_of_2(K)), BLOCK_N=ChunkWeights.BLOCK_N,
                    STICK_BREAKING=weight_rule == "stick_breaking", DECAY_PTR=decay_ptr)
        if n_rows:
            _chunk_weights_fwd_kernel[(triton.cdiv(n_rows, ChunkWeights.BLOCK_N),)](
                scores, indices, decay, w, n_rows, decay_value, **meta
            )
        ctx.save_for_backward(scores, indices, w, decay if decay_ptr else None)
        ctx.config = (n_rows, decay_value, meta, rank_decay if decay_ptr else None)
        return w

    @staticmethod
    def backward(ctx, dw):
        scores, indices, w, decay = ctx.saved_tensors
        n_rows, decay_value, meta, rank_decay = ctx.config
        blocks = triton.cdiv(n_rows, ChunkWeights.BLOCK_N)
        ds = torch.empty_like(scores)
        ddecay = torch.empty(max(blocks, 1), device=scores.device, dtype=torch.float32)
        if n_rows:
            _chunk_weights_bwd_kernel[(blocks,)](
                scores, indices, decay if decay is not None else scores, w, dw.float().contiguous(), ds, ddecay,
                n_rows, decay_value, **meta
            )
        else:
            ddecay.zero_()
        d_rank_decay = None
        if rank_decay is not None:
            d_rank_decay = ddecay.sum().to(rank_decay.dtype).reshape(rank_decay.shape)
        return ds, None, None, d_rank_decay


def retrieval_triton(q_r, landmarks, *, chunk_size, topk, weight_rule, gumbel, rank_decay, cu_seqlens, seed):
    """``hsa_retrieval`` on the Triton path: ``(indices int32 [B, L, R, K], weights fp32 [B, L, R, K])``."""
    idx, scores = topk_chunks(
        q_r, landmarks, chunk_size=chunk_size, topk=topk, gumbel=gumbel, cu_seqlens=cu_seqlens, seed=seed
    )
    if q_r.requires_grad or landmarks.requires_grad:
        scores = SelectedScores.apply(q_r, landmarks, idx, scores)
    if torch.is_tensor(rank_decay) and rank_decay.numel() != 1:  # the kernel takes one decay for all slots' ranks
        return idx, chunk_weights(scores, idx >= 0, weight_rule, rank_decay)
    return idx, ChunkWeights.apply(scores, idx, weight_rule, rank_decay)
