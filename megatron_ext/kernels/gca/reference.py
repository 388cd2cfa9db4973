"""Grouped Cross Attention (GCA) in plain PyTorch: the readable definition and the test oracle.

GCA (the DRT model) splits the sequence into chunks of S tokens. Each chunk has a landmark; the landmark of chunk c
retrieves the top-k earlier chunks e < c, and that selection, with softmax weights over the selected retrieval
scores, serves every token of the *next* chunk c + 1 (chunk c itself is covered by local attention). Attention then
runs in two stages:

1. every query token attends to each retrieved chunk separately (one softmax per chunk, no mask inside a chunk,
   because retrieved chunks lie wholly in the past);
2. the per-chunk outputs are summed with the retrieval weights, so the retrieval scores learn from how useful each
   chunk's attention output was (end-to-end causal retrieval).

Shapes are batch-first: q [B, L, Hq, D], k/v [B, Lkv, Hk, D] with chunk c at rows [c*S, (c+1)*S).
A selection is `indices [B, C, K]` (int32, -1 = empty slot) and `weights [B, C, K]` (fp32, 0 on empty slots),
shared by all heads and all tokens of a query chunk.

Two options exist beside plain softmax:
- `softmax_off_by_one`: every per-chunk softmax gets an extra null logit 0 with a zero value, so a token may attend
  to nothing in a chunk;
- `landmark_null_slot`: the last row of every chunk is DRT's landmark slot, whose K and V are zero; it gives a
  logit 0 with a zero value (the paper's model gets its off-by-one this way), and its k/v rows get no gradient.
"""

from __future__ import annotations

import math

import torch

from ..hsa.reference import chunk_weights, doc_start_chunks, gumbel_noise, select_chunks

__all__ = [
    "chunk_document_starts",
    "gca_attention_reference",
    "gca_decode_reference",
    "gca_decode_retrieval",
    "gca_retrieval_reference",
    "selection_for_query_chunks",
]


def chunk_document_starts(cu_seqlens: torch.Tensor, num_chunks: int, chunk_size: int) -> torch.Tensor:
    """For every chunk of a packed sequence, the first chunk of its document: int64 [num_chunks].

    cu_seqlens: [N+1] token offsets (0 first, total last); every document starts on a chunk boundary.
    Wraps the HSA token-level helper, so both families read cu_seqlens the same way.
    """
    total = int(cu_seqlens[-1])
    if -(-total // chunk_size) != num_chunks:
        raise ValueError(
            f"cu_seqlens covers {total} tokens = {-(-total // chunk_size)} chunks of {chunk_size}, but there are "
            f"{num_chunks} chunks (landmarks)"
        )
    return doc_start_chunks(cu_seqlens, total, chunk_size, device=cu_seqlens.device)[::chunk_size]


def gca_retrieval_reference(
    query_landmarks: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    chunk_size: int | None = None,
    sm_scale: float | None = None,
    gumbel: bool = False,
    generator: torch.Generator | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-level retrieval: the selection made BY each chunk's landmark.

    query_landmarks: [B, C, Dr] (chunk c's retrieval query), landmarks: [B, C, Dr] (chunk e's key).
    Chunk e is eligible for chunk c iff e < c (and, when packed, e lies in c's document).
    Score s[c, e] = <query_landmarks[c], landmarks[e]> * sm_scale (default 1/sqrt(Dr)); top-k of s (+ Gumbel noise
    if `gumbel`); weights = softmax over the noise-free scores of the selected chunks.
    Returns (indices [B, C, K] int32, most recent first, -1 on empty slots; weights [B, C, K] fp32, 0 on empty slots).
    Gradients reach both landmark inputs through the weights.
    NOTE: this is the selection made by chunk c; it serves query chunk c + 1 (see `selection_for_query_chunks`).
    The choice and the weights are HSA's (`select_chunks`, `chunk_weights`) on a chunk-level eligibility mask.
    """
    if query_landmarks.dim() != 3 or landmarks.shape != query_landmarks.shape:
        raise ValueError(
            "query_landmarks and landmarks must both be [B, C, Dr] with equal shapes, got "
            f"{tuple(query_landmarks.shape)} and {tuple(landmarks.shape)}"
        )
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    B, C, Dr = landmarks.shape
    device = landmarks.device
    scale = 1.0 / math.sqrt(Dr) if sm_scale is None else sm_scale
    # [B, C, 1, C]: HSA's [B, tokens, heads, chunks] layout with one "token" per chunk and one retrieval head.
    scores = torch.einsum("bcd,bed->bce", query_landmarks.float(), landmarks.float())[:, :, None, :] * scale

    chunk = torch.arange(C, device=device)
    eligible = chunk[None, :] < chunk[:, None]  # [C(query), C(key)]: strictly earlier chunks
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"packed retrieval (cu_seqlens given) needs batch size 1, got B={B}")
        if chunk_size is None:
            raise ValueError("cu_seqlens is in tokens: pass chunk_size to map chunks to documents")
        first = chunk_document_starts(cu_seqlens.to(device), C, chunk_size)
        eligible = eligible & (chunk[None, :] >= first[:, None])

    noise = gumbel_noise(scores.shape, device, generator) if gumbel else None
    indices, picked = select_chunks(scores.detach(), eligible, topk, noise)
    valid = indices >= 0
    picked = scores.gather(-1, indices.clamp(min=0))  # noise-free and differentiable
    weights = chunk_weights(picked, valid, "softmax")
    return indices[:, :, 0].to(torch.int32), weights[:, :, 0]


def gca_decode_retrieval(
    query: torch.Tensor, landmarks: torch.Tensor, *, topk: int, sm_scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection made by the chunk just completed (decode): its query [B, Dr] against the landmarks
    [B, c, Dr] of the c chunks before it, all eligible. Returns (indices [B, K] int32, most recent first, -1 =
    empty; weights [B, K] fp32): row c of `gca_retrieval_reference` without the [C, C] scores of the earlier rows;
    it serves the tokens of the next chunk."""
    if query.dim() != 2 or landmarks.dim() != 3 or landmarks.shape[::2] != query.shape:
        raise ValueError(f"query must be [B, Dr] and landmarks [B, c, Dr], got {tuple(query.shape)} and "
                         f"{tuple(landmarks.shape)}")
    B, C, Dr = landmarks.shape
    scale = 1.0 / math.sqrt(Dr) if sm_scale is None else sm_scale
    scores = torch.einsum("bd,bed->be", query.float(), landmarks.float())[:, None, None, :] * scale
    eligible = torch.ones(1, C, dtype=torch.bool, device=landmarks.device)
    indices, picked = select_chunks(scores, eligible, topk)
    weights = chunk_weights(picked, indices >= 0, "softmax")
    return indices[:, 0, 0].to(torch.int32), weights[:, 0, 0]


def selection_for_query_chunks(
    indices: torch.Tensor,
    weights: torch.Tensor,
    *,
    chunk_size: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift a selection from "made by chunk c" (what `gca_retrieval` returns) to "serves query chunk c" (what
    `gca_attention` takes): the selection made by chunk c - 1 serves chunk c.

    indices/weights: [B, C, K]. Returns tensors of the same shapes; query chunk 0 (and, when packed, the first chunk
    of every document) gets an empty selection (index -1, weight 0). Differentiable in weights.
    """
    if indices.shape != weights.shape or indices.dim() != 3:
        raise ValueError(
            f"indices and weights must both be [B, C, K], got {tuple(indices.shape)} and {tuple(weights.shape)}"
        )
    B, C, K = indices.shape
    shifted_idx = torch.cat([torch.full_like(indices[:, :1], -1), indices[:, :-1]], dim=1)
    shifted_w = torch.cat([torch.zeros_like(weights[:, :1]), weights[:, :-1]], dim=1)
    if cu_seqlens is not None:
        if chunk_size is None:
            raise ValueError("cu_seqlens is in tokens: pass chunk_size to map chunks to documents")
        first = chunk_document_starts(cu_seqlens.to(indices.device), C, chunk_size)
        first_of_doc = (first == torch.arange(C, device=indices.device))[None, :, None]
        shifted_idx = torch.where(first_of_doc, torch.full_like(shifted_idx, -1), shifted_idx)
        shifted_w = torch.where(first_of_doc, torch.zeros_like(shifted_w), shifted_w)
    return shifted_idx, shifted_w


def _grouped_chunk_attention(
    q_groups: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int,
    sm_scale: float,
    softmax_off_by_one: bool,
    landmark_null_slot: bool,
) -> torch.Tensor:
    """Core of both the training and the decode reference.

    q_groups: [B, N, M, Hq, D], N groups of M tokens, each group sharing one selection;
    k, v: [B, Lkv, Hk, D]; weights, indices: [B, N, K]. Returns [B, N, M, Hq, D] in fp32.
    """
    B, N, M, Hq, D = q_groups.shape
    Lkv, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    S = chunk_size
    num_kv_chunks = -(-Lkv // S)
    pad = num_kv_chunks * S - Lkv
    row_exists = torch.arange(num_kv_chunks * S, device=k.device) < Lkv
    kf = torch.nn.functional.pad(k.float(), (0, 0, 0, 0, 0, pad)).view(B, num_kv_chunks, S, Hk, D)
    vf = torch.nn.functional.pad(v.float(), (0, 0, 0, 0, 0, pad)).view(B, num_kv_chunks, S, Hk, D)
    row_exists = row_exists.view(num_kv_chunks, S)
    if landmark_null_slot:
        zero_last = torch.ones(S, device=k.device, dtype=kf.dtype)
        zero_last[-1] = 0.0
        kf = kf * zero_last[None, None, :, None, None]
        vf = vf * zero_last[None, None, :, None, None]

    valid = (indices >= 0) & (indices < num_kv_chunks)  # other indices are empty slots, as in the kernels
    idx = torch.where(valid, indices, 0).long()  # [B, N, K]
    batch = torch.arange(B, device=k.device)[:, None, None]
    k_sel = kf[batch, idx]  # [B, N, K, S, Hk, D]
    v_sel = vf[batch, idx]
    col_exists = row_exists[idx]  # [B, N, K, S]

    qf = q_groups.float().view(B, N, M, Hk, G, D)
    logits = torch.einsum("bnmhgd,bnkshd->bnhgkms", qf, k_sel) * sm_scale  # [B, N, Hk, G, K, M, S]
    logits = logits.masked_fill(~col_exists[:, :, None, None, :, None, :], float("-inf"))
    if softmax_off_by_one:
        null = torch.zeros_like(logits[..., :1])
        probs = torch.softmax(torch.cat([logits, null], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # a chunk with no existing rows attends to nothing
    per_chunk = torch.einsum("bnhgkms,bnkshd->bnhgkmd", probs, v_sel)  # stage 1: [B, N, Hk, G, K, M, D]
    w = (weights.float() * valid)[:, :, None, None, :, None, None]
    out = (per_chunk * w).sum(dim=4)  # stage 2: [B, N, Hk, G, M, D]
    return out.permute(0, 1, 4, 2, 3, 5).reshape(B, N, M, Hq, D)


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch (dim 0) and head dim (last dim)"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads Hq={q.shape[2]} must be a multiple of KV heads Hk={k.shape[2]}")


def gca_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int,
    sm_scale: float | None = None,
    softmax_off_by_one: bool = False,
    landmark_null_slot: bool = False,
) -> torch.Tensor:
    """GCA attention, training form: q [B, L, Hq, D], k/v [B, Lkv, Hk, D], weights/indices [B, ceil(L/S), K]
    indexed by the QUERY chunk. Token t of query chunk c = t // S attends to chunks indices[b, c, :]; indices < 0 or
    >= ceil(Lkv/S) are empty slots (skipped, weight gradient 0).
    Returns o [B, L, Hq, D] in q's dtype (computed in fp32). Differentiable in q, k, v and weights.
    """
    _check_heads(q, k, v)
    B, L, Hq, D = q.shape
    S = chunk_size
    num_q_chunks = -(-L // S)
    if indices.shape != (B, num_q_chunks, indices.shape[-1]) or weights.shape != indices.shape:
        raise ValueError(
            f"indices and weights must be [B, ceil(L/S), K] = [{B}, {num_q_chunks}, K] (one selection per query "
            f"chunk), got {tuple(indices.shape)} and {tuple(weights.shape)}"
        )
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, 0, 0, num_q_chunks * S - L))
    out = _grouped_chunk_attention(
        q_pad.view(B, num_q_chunks, S, Hq, D), k, v, weights, indices,
        chunk_size=S, sm_scale=scale, softmax_off_by_one=softmax_off_by_one, landmark_null_slot=landmark_null_slot,
    )
    return out.reshape(B, num_q_chunks * S, Hq, D)[:, :L].to(q.dtype)


def gca_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int,
    sm_scale: float | None = None,
    softmax_off_by_one: bool = False,
    landmark_null_slot: bool = False,
) -> torch.Tensor:
    """GCA for T new tokens (decode): q [B, T, Hq, D] against cached chunk K/V [B, Lc, Hk, D].
    weights/indices: [B, K] (one selection for all T tokens) or [B, T, K] (one per token).
    Returns o [B, T, Hq, D] in q's dtype.
    """
    _check_heads(q, k_cache, v_cache)
    B, T, Hq, D = q.shape
    if indices.dim() == 2:
        indices, weights = indices[:, None].expand(B, T, -1), weights[:, None].expand(B, T, -1)
    if indices.shape[:2] != (B, T) or weights.shape != indices.shape:
        raise ValueError(
            f"indices/weights must be [B, K] or [B, T, K] with B={B}, T={T}, got {tuple(indices.shape)} and "
            f"{tuple(weights.shape)}"
        )
    if k_cache.shape[1] == 0:  # no complete chunk yet: every slot is empty
        return torch.zeros_like(q)
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    out = _grouped_chunk_attention(
        q.view(B, T, 1, Hq, D), k_cache, v_cache, weights, indices,
        chunk_size=chunk_size, sm_scale=scale, softmax_off_by_one=softmax_off_by_one,
        landmark_null_slot=landmark_null_slot,
    )
    return out.view(B, T, Hq, D).to(q.dtype)
