"""Public HSA functions: argument checks, backend choice, and the autograd ops over the Triton kernels.

Shapes (batch first): q ``[B, L, Hq, D]``, k/v ``[B, C*S, Hk, D]``, q_r ``[B, L, R, Dr]``,
landmarks ``[B, C, R, Dr]``, indices/weights ``[B, L, Hk or R, K]``.
"""

from __future__ import annotations

import torch

from megatron_ext.kernels.hsa import reference as ref
from megatron_ext.kernels.utils import backend_for_sizes, check_dtype, resolve_backend

__all__ = ["hsa_retrieval", "hsa_attention", "hsa_decode", "ATTENTION_SCHEDULES"]

# Loop orders of the Triton kernels (attention.py explains both):
# "token": one program per (token, KV head) gathers its K selected chunks; the G query heads of the group fill the
#   MMA rows, so it is efficient when G >= 16.
# "chunk": one program per (chunk, KV head) visits the (token, slot) pairs that selected it (reverse index) and
#   packs several tokens per tile, so small groups (G < 16) still fill the MMA rows; per-slot results are summed
#   afterwards through a [B, L, Hk, K, G, D] buffer, or (bf16 on GPUs, long memories) added with atomics into an
#   fp16 accumulator, token range by token range.
# "auto": the fastest measured per shape (megatron_ext.kernels.hsa.attention.auto_schedules).
# "token" / "chunk" use that order in both passes ("token" is the one without per-slot buffers: least memory).
ATTENTION_SCHEDULES = ("auto", "token", "chunk")
# Smallest chunk the Triton kernels take on a GPU ("auto" runs smaller chunks, and chunks that are not a power of
# two, on the PyTorch reference).
MIN_TRITON_CHUNK_SIZE = 16


def hsa_retrieval(
    q_r: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    chunk_size: int,
    topk: int,
    weight_rule: str = "softmax",
    gumbel: bool = False,
    rank_decay: torch.Tensor | float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    seed: int | None = None,
):
    """Select the top-k past chunks of every token and weigh them.

    q_r ``[B, L, R, Dr]``, landmarks ``[B, C, R, Dr]`` -> ``indices`` int32 ``[B, L, R, K]`` (most recent first, -1 in
    invalid slots) and ``weights`` fp32 ``[B, L, R, K]`` (0 in invalid slots). Chunk c is eligible for token t iff
    (c+1)*S <= t and, with ``cu_seqlens`` (packed, B == 1, documents starting on chunk boundaries), c lies in t's
    document. ``gumbel`` adds Gumbel noise to the scores for the choice only (training); ``seed`` fixes it.
    Gradients reach q_r, landmarks and a tensor ``rank_decay`` through the weights.
    """
    ref._check_retrieval_inputs(q_r, landmarks, chunk_size, topk)
    _check_retrieval_dtypes(q_r, landmarks)
    if cu_seqlens is not None and q_r.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) need batch size 1, got {q_r.shape[0]}")
    if resolve_backend(backend, q_r, landmarks) == "reference":
        gen = None
        if gumbel and seed is not None:
            gen = torch.Generator(device=q_r.device).manual_seed(seed)
        return ref.hsa_retrieval_reference(
            q_r, landmarks, chunk_size=chunk_size, topk=topk, weight_rule=weight_rule, gumbel=gumbel,
            rank_decay=rank_decay, cu_seqlens=cu_seqlens, generator=gen,
        )
    from megatron_ext.kernels.hsa.retrieval import retrieval_triton

    return retrieval_triton(
        q_r, landmarks, chunk_size=chunk_size, topk=topk, weight_rule=weight_rule, gumbel=gumbel,
        rank_decay=rank_decay, cu_seqlens=cu_seqlens, seed=seed,
    )


def _check_retrieval_dtypes(q_r: torch.Tensor, landmarks: torch.Tensor) -> None:
    check_dtype("q_r", q_r)
    check_dtype("landmarks", landmarks)
    if q_r.dtype != landmarks.dtype:
        raise TypeError(f"q_r ({q_r.dtype}) and landmarks ({landmarks.dtype}) must share a dtype")


def _check_attention_dtypes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_dtype(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def _chunk_size_unsupported(chunk_size: int, on_gpu: bool) -> str | None:
    """Why the chunk-attention kernels cannot take ``chunk_size``, or None. A chunk is one tile (``tl.arange`` needs
    a power of two) and, on a GPU, the contraction of the per-chunk P @ V and dS @ K products, which tensor-core dots
    need at least 16 elements long."""
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        return (
            f"the Triton HSA kernels need a power-of-two chunk_size ({MIN_TRITON_CHUNK_SIZE}, 32, 64, 128, ...), "
            f"got {chunk_size}"
        )
    if on_gpu and chunk_size < MIN_TRITON_CHUNK_SIZE:
        return (
            f"the Triton HSA kernels need chunk_size >= {MIN_TRITON_CHUNK_SIZE} on GPUs (a power of two: "
            f"{MIN_TRITON_CHUNK_SIZE}, 32, 64, 128, ...; the models use 64), got {chunk_size}"
        )
    return None


def _attention_backend(backend: str, chunk_size: int, *tensors: torch.Tensor) -> str:
    """``resolve_backend`` for the chunk-attention kernels (training and decode): chunk sizes they do not take run on
    the reference under "auto" and are an error under "triton" (``_chunk_size_unsupported``)."""
    unsupported = _chunk_size_unsupported(chunk_size, tensors[0].is_cuda)
    return backend_for_sizes(backend, unsupported, *tensors)


def hsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    *,
    chunk_size: int,
    sm_scale: float | None = None,
    softmax_off_by_one: bool = False,
    backend: str = "auto",
    schedule: str = "auto",
) -> torch.Tensor:
    """Sparse chunk attention: o[t, g] = sum_k w[t, h, k] * softmax(q[t, g] K_c^T * scale) V_c, c = indices[t, h, k].

    q ``[B, L, Hq, D]``, k/v ``[B, C*S, Hk, D]``, weights/indices ``[B, L, Hk, K]`` -> o ``[B, L, Hq, D]``.
    Indices < 0 or >= C are skipped (no output, weight gradient 0); an empty memory (C = 0) gives zeros.
    Gradients flow to q, k, v and weights (fp32), never to indices.
    ``schedule`` picks the Triton loop order: "auto" (fastest), "token" (least memory) or "chunk"; see
    ``ATTENTION_SCHEDULES``.
    """
    ref._check_attention_inputs(q, k, v, weights, indices, chunk_size)
    _check_attention_dtypes(q, k, v)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if schedule not in ATTENTION_SCHEDULES:
        raise ValueError(f"schedule must be one of {ATTENTION_SCHEDULES}, got {schedule!r}")
    if _attention_backend(backend, chunk_size, q, k, v) == "reference":
        return ref.hsa_attention_reference(
            q, k, v, weights, indices, chunk_size=chunk_size, sm_scale=sm_scale,
            softmax_off_by_one=softmax_off_by_one,
        )
    from megatron_ext.kernels.hsa.attention import HSAAttentionFunction, auto_schedules, pass_shape

    # ctx.needs_input_grad ignores torch.no_grad(): whether a backward can follow is decided here
    for_backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, weights))
    if schedule == "auto":
        group = q.shape[2] // k.shape[2]
        fwd_schedule, bwd_schedule = auto_schedules(
            group, chunk_size, q.shape[-1], for_backward, pass_shape(q, k, indices)
        )
    else:
        fwd_schedule = bwd_schedule = schedule
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return HSAAttentionFunction.apply(
        q, k, v, weights, indices, chunk_size, scale, softmax_off_by_one, fwd_schedule, bwd_schedule, for_backward
    )


def hsa_decode(
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
    backend: str = "auto",
):
    """Inference: one new token per sequence against the cached chunk K/V and landmarks.

    q ``[B, Hq, D]``, q_r ``[B, R, Dr]`` (R = Hk or 1), k_cache/v_cache ``[B, C*S, Hk, D]``,
    landmarks ``[B, C, R, Dr]``, positions int ``[B]`` = index of the new token in its sequence (chunks with
    (c+1)*S <= position are eligible; caches may hold more chunks than that).
    Returns ``(o [B, Hq, D], indices [B, Hk, K] int32, weights [B, Hk, K] fp32)``.
    """
    # the attention op's checks: the Triton path would otherwise leave heads unwritten or read past the cache
    ref._check_decode_inputs(q, q_r, k_cache, v_cache, landmarks, positions, chunk_size, topk)
    _check_attention_dtypes(q, k_cache, v_cache)
    _check_retrieval_dtypes(q_r, landmarks)
    if _attention_backend(backend, chunk_size, q, k_cache, v_cache) == "reference":
        return ref.hsa_decode_reference(
            q, q_r, k_cache, v_cache, landmarks, positions, chunk_size=chunk_size, topk=topk,
            weight_rule=weight_rule, rank_decay=rank_decay, sm_scale=sm_scale, softmax_off_by_one=softmax_off_by_one,
        )
    from megatron_ext.kernels.hsa.decode import decode_triton

    return decode_triton(
        q, q_r, k_cache, v_cache, landmarks, positions, chunk_size=chunk_size, topk=topk, weight_rule=weight_rule,
        rank_decay=rank_decay, sm_scale=sm_scale, softmax_off_by_one=softmax_off_by_one,
    )
