"""Hierarchical Sparse Attention in plain PyTorch: the readable definition and the test oracle.

Notation: B batch, L tokens, S chunk size, C chunks, K top-k, R retrieval heads, Dr retrieval head dim,
Hq query heads, Hk KV heads, G = Hq / Hk, D head dim.

Retrieval: token t scores every chunk c by <q_r[t], landmark[c]> / sqrt(Dr). Chunk c is eligible iff it is complete
and lies strictly before t's own chunk, (c+1)*S <= t, and (packed batches) belongs to t's document. The top-k
eligible chunks are selected (optionally on Gumbel-perturbed scores), ordered most recent first; slots without an
eligible chunk carry index -1 and weight 0. The weights come from the noise-free scores of the selected chunks:
softmax over the slots, or stick-breaking in slot order; an optional rank decay adds slot*p to the logits.

Attention: every query head of a KV group attends to each selected chunk separately (softmax over the S tokens of
that chunk, optionally with an extra null logit 0 = off-by-one softmax), and the per-chunk outputs are summed with
the retrieval weights.

Everything is computed in fp32; these functions are written for clarity, not speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "doc_start_chunks",
    "eligibility_mask",
    "retrieval_scores",
    "gumbel_noise",
    "select_chunks",
    "chunk_weights",
    "hsa_retrieval_reference",
    "hsa_attention_reference",
    "hsa_decode_reference",
    "decode_retrieval",
]

WEIGHT_RULES = ("softmax", "stick_breaking")


def doc_start_chunks(cu_seqlens: torch.Tensor | None, seq_len: int, chunk_size: int, device=None) -> torch.Tensor:
    """For every token, the first chunk of its document: int64 ``[L]`` (all zeros without ``cu_seqlens``).

    ``cu_seqlens`` ``[n_docs + 1]`` holds document offsets into the packed sequence, starting at 0 and ending at L;
    every document must start on a chunk boundary.
    """
    if cu_seqlens is None:
        return torch.zeros(seq_len, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if int(cu[0]) != 0 or int(cu[-1]) != seq_len:
        raise ValueError(f"cu_seqlens must start at 0 and end at the sequence length {seq_len}, got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")
    if bool((cu[:-1] % chunk_size != 0).any()):
        raise ValueError(
            f"every document must start on a chunk boundary (cu_seqlens[:-1] % chunk_size == 0, chunk_size="
            f"{chunk_size}); pad documents to a multiple of the chunk size when packing"
        )
    positions = torch.arange(seq_len, device=device)
    doc = torch.searchsorted(cu[1:], positions, right=True)  # document id of every token
    return cu[doc] // chunk_size


def eligibility_mask(
    seq_len: int, num_chunks: int, chunk_size: int, cu_seqlens: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """Bool ``[L, C]``: chunk c is visible to token t iff (c+1)*S <= t and c lies in t's document."""
    t = torch.arange(seq_len, device=device)[:, None]
    c = torch.arange(num_chunks, device=device)[None, :]
    lo = doc_start_chunks(cu_seqlens, seq_len, chunk_size, device)[:, None]
    return ((c + 1) * chunk_size <= t) & (c >= lo)


def retrieval_scores(q_r: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
    """fp32 ``[B, L, R, C]`` = <q_r[b,t,r], landmarks[b,c,r]> / sqrt(Dr)."""
    scale = 1.0 / math.sqrt(q_r.shape[-1])
    return torch.einsum("btrd,bcrd->btrc", q_r.float(), landmarks.float()) * scale


def gumbel_noise(shape, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise, -log(E) with E ~ Exp(1)."""
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def select_chunks(scores: torch.Tensor, eligible: torch.Tensor, topk: int, noise: torch.Tensor | None = None):
    """Top-k eligible chunks per (token, head), ordered most recent first.

    scores: fp32 ``[B, L, R, C]``; eligible: bool ``[L, C]`` (or broadcastable to scores);
    noise: optional ``[B, L, R, C]`` added to the scores for the choice only.
    Returns ``indices`` int64 ``[B, L, R, K]`` (-1 in slots without an eligible chunk) and the noise-free scores of
    the selected chunks (fp32, -inf in invalid slots).
    """
    B, L, R, C = scores.shape
    if eligible.dim() == 2:
        eligible = eligible[None, :, None, :]
    ranked = scores if noise is None else scores + noise
    ranked = ranked.masked_fill(~eligible, float("-inf"))
    k_avail = min(topk, C)
    indices = torch.full((B, L, R, topk), -1, dtype=torch.long, device=scores.device)
    if k_avail > 0:
        top_vals, top_idx = ranked.topk(k_avail, dim=-1)
        indices[..., :k_avail] = torch.where(torch.isfinite(top_vals), top_idx, -1)
    indices = indices.sort(dim=-1, descending=True).values  # most recent first; -1 sorts last
    valid = indices >= 0
    picked = scores.gather(-1, indices.clamp(min=0)) if C > 0 else torch.zeros_like(indices, dtype=scores.dtype)
    return indices, picked.masked_fill(~valid, float("-inf"))


def chunk_weights(
    selected_scores: torch.Tensor,
    valid: torch.Tensor,
    weight_rule: str = "softmax",
    rank_decay: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """fp32 weights ``[..., K]`` from the selected scores (slots most recent first); 0 in invalid slots.

    softmax: w = softmax over the valid slots of (s_k + k*p);
    stick_breaking: w_k = sigma(x_k) * prod_{j<k} (1 - sigma(x_j)) = exp(x_k - sum_{j<=k} softplus(x_j)),
    with x_k = s_k + k*p.
    Rank decay p (a scalar, learnable) adds a recency bias by slot rank; None means p = 0.
    """
    if weight_rule not in WEIGHT_RULES:
        raise ValueError(f"weight_rule must be one of {WEIGHT_RULES}, got {weight_rule!r}")
    logits = selected_scores.float()
    if rank_decay is not None:
        ranks = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
        logits = logits + ranks * (rank_decay if torch.is_tensor(rank_decay) else float(rank_decay))
    logits = torch.where(valid, logits, torch.zeros_like(logits))  # keep invalid slots finite for autograd
    if weight_rule == "softmax":
        masked = logits.masked_fill(~valid, float("-inf"))
        row_max = masked.amax(dim=-1, keepdim=True).clamp(min=-1e30).detach()
        e = torch.where(valid, torch.exp(logits - row_max), torch.zeros_like(logits))
        denom = e.sum(dim=-1, keepdim=True)
        return e / torch.where(denom > 0, denom, torch.ones_like(denom))
    broken = torch.cumsum(torch.where(valid, F.softplus(logits), torch.zeros_like(logits)), dim=-1)
    return torch.where(valid, torch.exp(logits - broken), torch.zeros_like(logits))


def _check_retrieval_inputs(q_r, landmarks, chunk_size, topk):
    if q_r.dim() != 4 or landmarks.dim() != 4:
        raise ValueError(
            f"q_r must be [B, L, R, Dr] and landmarks [B, C, R, Dr]; "
            f"got {tuple(q_r.shape)} and {tuple(landmarks.shape)}"
        )
    if q_r.shape[0] != landmarks.shape[0] or q_r.shape[2:] != landmarks.shape[2:]:
        raise ValueError(
            f"q_r {tuple(q_r.shape)} and landmarks {tuple(landmarks.shape)} must agree in batch, heads and head dim"
        )
    if chunk_size < 1 or topk < 1:
        raise ValueError(f"chunk_size and topk must be >= 1, got chunk_size={chunk_size}, topk={topk}")


def hsa_retrieval_reference(
    q_r: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    weight_rule: str = "softmax",
    gumbel: bool = False,
    rank_decay: torch.Tensor | float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
):
    """Reference retrieval. q_r ``[B, L, R, Dr]``, landmarks ``[B, C, R, Dr]``.

    Returns ``indices`` int32 ``[B, L, R, K]`` and ``weights`` fp32 ``[B, L, R, K]`` (differentiable w.r.t. q_r,
    landmarks and rank_decay). ``noise`` (``[B, L, R, C]``) overrides the Gumbel sample, for tests.
    """
    _check_retrieval_inputs(q_r, landmarks, chunk_size, topk)
    B, L, R, _ = q_r.shape
    C = landmarks.shape[1]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {B}")
    scores = retrieval_scores(q_r, landmarks)
    eligible = eligibility_mask(L, C, chunk_size, cu_seqlens, q_r.device)
    if gumbel and noise is None:
        noise = gumbel_noise(scores.shape, scores.device, generator)
    indices, _ = select_chunks(scores.detach(), eligible, topk, noise if gumbel or noise is not None else None)
    valid = indices >= 0
    picked = scores.gather(-1, indices.clamp(min=0)) if C > 0 else torch.zeros(indices.shape, device=q_r.device)
    weights = chunk_weights(picked, valid, weight_rule, rank_decay)
    return indices.to(torch.int32), weights


def _check_kv_inputs(q, k, v, chunk_size):
    """q ``[B, L, Hq, D]`` against the memory k/v ``[B, C*S, Hk, D]`` (training and decode)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, L, Hq, D], [B, C*S, Hk, D], [B, C*S, Hk, D]; got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, L, Hq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B={B}, C*S, Hk, D={D}]")
    Hk = k.shape[2]
    if Hq % Hk != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hk})")
    if k.shape[1] % chunk_size != 0:
        raise ValueError(
            f"k/v length {k.shape[1]} must be a multiple of chunk_size {chunk_size} (memory holds whole chunks)"
        )


def _check_attention_inputs(q, k, v, weights, indices, chunk_size):
    _check_kv_inputs(q, k, v, chunk_size)
    B, L, Hk = q.shape[0], q.shape[1], k.shape[2]
    if weights.shape != indices.shape or weights.dim() != 4 or weights.shape[:3] != (B, L, Hk):
        raise ValueError(
            f"weights and indices must both be [B={B}, L={L}, Hk={Hk}, K]; got {tuple(weights.shape)} and "
            f"{tuple(indices.shape)} (expand a single retrieval head to Hk heads first)"
        )


def hsa_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int,
    sm_scale: float | None = None,
    softmax_off_by_one: bool = False,
) -> torch.Tensor:
    """Reference sparse chunk attention.

    q ``[B, L, Hq, D]``, k/v ``[B, C*S, Hk, D]``, weights/indices ``[B, L, Hk, K]`` -> o ``[B, L, Hq, D]`` (q.dtype).
    Slots with an index < 0 or >= C are skipped: they contribute nothing, whatever their weight, and their weight
    gradient is 0. An empty memory (C = 0) gives zeros.
    """
    _check_attention_inputs(q, k, v, weights, indices, chunk_size)
    B, L, Hq, D = q.shape
    Hk, K, S = k.shape[2], indices.shape[-1], chunk_size
    C = k.shape[1] // S
    G = Hq // Hk
    scale = D**-0.5 if sm_scale is None else sm_scale
    qg = q.float().reshape(B, L, Hk, G, D)
    # one zero chunk (index C) after the memory: skipped slots read it, so an empty memory needs no special case
    kh, vh = (F.pad(x.float(), (0, 0, 0, 0, 0, S)).transpose(1, 2) for x in (k, v))  # [B, Hk, (C+1)*S, D]
    b_ar = torch.arange(B, device=q.device)[:, None, None, None]
    h_ar = torch.arange(Hk, device=q.device)[None, None, :, None]
    tok = torch.arange(S, device=q.device)
    out = torch.zeros(B, L, Hk, G, D, device=q.device, dtype=torch.float32)
    for slot in range(K):
        idx = indices[..., slot].long()  # [B, L, Hk]
        valid = (idx >= 0) & (idx < C)
        rows = torch.where(valid, idx, C)[..., None] * S + tok  # [B, L, Hk, S]
        kc, vc = kh[b_ar, h_ar, rows], vh[b_ar, h_ar, rows]  # [B, L, Hk, S, D]
        logits = torch.einsum("blhgd,blhsd->blhgs", qg, kc) * scale
        if softmax_off_by_one:  # an extra null logit 0 with a zero value
            logits = torch.cat([logits, torch.zeros_like(logits[..., :1])], dim=-1)
            probs = torch.softmax(logits, dim=-1)[..., :S]
        else:
            probs = torch.softmax(logits, dim=-1)
        chunk_out = torch.einsum("blhgs,blhsd->blhgd", probs, vc)
        w = torch.where(valid, weights[..., slot].float(), torch.zeros_like(weights[..., slot].float()))
        out = out + w[..., None, None] * chunk_out
    return out.reshape(B, L, Hq, D).to(q.dtype)


def _check_decode_inputs(q, q_r, k_cache, v_cache, landmarks, positions, chunk_size, topk):
    """The decode inputs' shapes (see ``hsa_decode_reference``); both backends run these checks."""
    if q.dim() != 3 or q_r.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D] and q_r [B, R, Dr]; got {tuple(q.shape)} and {tuple(q_r.shape)}")
    _check_kv_inputs(q[:, None], k_cache, v_cache, chunk_size)
    _check_retrieval_inputs(q_r[:, None], landmarks, chunk_size, topk)
    B, Hk = q.shape[0], k_cache.shape[2]
    if positions.shape != (B,):
        raise ValueError(f"positions must be [B={B}], got {tuple(positions.shape)}")
    if q_r.shape[0] != B:
        raise ValueError(f"q_r {tuple(q_r.shape)} and q {tuple(q.shape)} must have the same batch size")
    if q_r.shape[1] not in (1, Hk):
        raise ValueError(f"retrieval heads must be 1 or Hk={Hk}, got {q_r.shape[1]}")
    cached_chunks = k_cache.shape[1] // chunk_size
    if landmarks.shape[1] > cached_chunks:
        raise ValueError(
            f"landmarks hold {landmarks.shape[1]} chunks but the K/V cache only {cached_chunks} "
            f"({k_cache.shape[1]} rows / chunk_size {chunk_size}): append a chunk's K/V before its landmark"
        )


def decode_retrieval(q_r, landmarks, positions, *, chunk_size, topk, weight_rule="softmax", rank_decay=None):
    """Retrieval for one new token per sequence: q_r ``[B, R, Dr]``, landmarks ``[B, C, R, Dr]``, positions ``[B]``
    -> indices int64 ``[B, R, K]`` and weights fp32 ``[B, R, K]``."""
    C = landmarks.shape[1]
    scores = retrieval_scores(q_r[:, None], landmarks)  # [B, 1, R, C]
    c = torch.arange(C, device=q_r.device)
    eligible = (c[None, :] + 1) * chunk_size <= positions.to(q_r.device).long()[:, None]  # [B, C]
    indices, picked = select_chunks(scores, eligible[:, None, None, :], topk)
    weights = chunk_weights(picked, indices >= 0, weight_rule, rank_decay)
    return indices[:, 0], weights[:, 0]


def hsa_decode_reference(
    q: torch.Tensor,
    q_r: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    landmarks: torch.Tensor,
    positions: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    weight_rule: str = "softmax",
    rank_decay: torch.Tensor | float | None = None,
    sm_scale: float | None = None,
    softmax_off_by_one: bool = False,
):
    """One new token per sequence against cached chunks.

    q ``[B, Hq, D]``, q_r ``[B, R, Dr]``, k/v_cache ``[B, C*S, Hk, D]``, landmarks ``[B, C, R, Dr]``,
    positions int ``[B]`` (the new token's index t: chunks with (c+1)*S <= t are eligible).
    Returns ``(o [B, Hq, D], indices [B, Hk, K] int32, weights [B, Hk, K] fp32)``.
    """
    _check_decode_inputs(q, q_r, k_cache, v_cache, landmarks, positions, chunk_size, topk)
    B, R = q_r.shape[0], q_r.shape[1]
    Hk = k_cache.shape[2]
    indices, weights = decode_retrieval(
        q_r, landmarks, positions, chunk_size=chunk_size, topk=topk, weight_rule=weight_rule, rank_decay=rank_decay
    )
    if R != Hk:
        indices, weights = indices.expand(B, Hk, topk), weights.expand(B, Hk, topk)
    o = hsa_attention_reference(
        q[:, None], k_cache, v_cache, weights[:, None], indices[:, None],
        chunk_size=chunk_size, sm_scale=sm_scale, softmax_off_by_one=softmax_off_by_one,
    )[:, 0]
    return o, indices.to(torch.int32), weights
