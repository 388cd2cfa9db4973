"""Public GCA entry points: argument checks, backend choice and the autograd op over the Triton kernels.

`backend="auto"` runs Triton on CUDA tensors or under TRITON_INTERPRET=1, else the PyTorch reference.
Retrieval is chunk-level (a [C, C] score matrix per sample, C = L/S, small even at 128K tokens) and runs in
PyTorch on every backend.
"""

from __future__ import annotations

import math

import torch

from ..utils import backend_for_sizes, resolve_backend
from .reference import (
    gca_attention_reference,
    gca_decode_reference,
    gca_decode_retrieval,
    gca_retrieval_reference,
    selection_for_query_chunks,
)

__all__ = ["gca_attention", "gca_decode", "gca_decode_retrieval", "gca_retrieval", "selection_for_query_chunks"]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
SUPPORTED_CHUNK_SIZES = (16, 32, 64, 128)


def _use_triton(backend: str, chunk_size: int, q, k, v) -> bool:
    """Whether to run the Triton kernels. Sizes they do not cover run on the reference under "auto" and are an
    error under "triton"; dtype mismatches are an error when the kernels run."""
    if backend_for_sizes(backend, _kernel_unsupported(q, chunk_size), q, k, v) != "triton":
        return False
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype among fp32/fp16/bf16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    return True


def _check_shapes(q, k, v, chunk_size: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and head dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads Hq={q.shape[2]} must be a multiple of KV heads Hk={k.shape[2]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def _kernel_unsupported(q, chunk_size: int) -> str | None:
    """Why the Triton kernels cannot take these sizes (the reference covers any), or None."""
    if chunk_size not in SUPPORTED_CHUNK_SIZES:
        return f"chunk_size must be one of {SUPPORTED_CHUNK_SIZES} for the Triton kernels, got {chunk_size}"
    if q.shape[3] not in SUPPORTED_HEAD_DIMS:
        return f"head dim must be one of {SUPPORTED_HEAD_DIMS} for the Triton kernels, got {q.shape[3]}"
    return None


def gca_retrieval(
    query_landmarks: torch.Tensor,
    landmarks: torch.Tensor,
    *,
    topk: int,
    chunk_size: int | None = None,
    sm_scale: float | None = None,
    gumbel: bool = False,
    generator: torch.Generator | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-level top-k retrieval: the selection made BY chunk c's landmark (chunks e < c, same document).

    query_landmarks, landmarks: [B, C, Dr]. Returns (indices [B, C, K] int32, most recent first, -1 = empty;
    weights [B, C, K] fp32 softmax of the noise-free selected scores, 0 = empty). `gumbel=True` adds Gumbel noise
    to the ranking (training). Use `selection_for_query_chunks` to turn it into the per-query-chunk selection that
    `gca_attention` takes. All backends run the PyTorch implementation.
    """
    resolve_backend(backend, query_landmarks)  # validates the name
    return gca_retrieval_reference(
        query_landmarks, landmarks, topk=topk, chunk_size=chunk_size, sm_scale=sm_scale, gumbel=gumbel,
        generator=generator, cu_seqlens=cu_seqlens,
    )


class _GCAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, weights, indices, chunk_size, sm_scale, softmax_off_by_one, landmark_null_slot):
        from .triton_attention import gca_attention_forward

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        indices = indices.to(torch.int32).contiguous()
        weights_f = weights.float().contiguous()
        o, lse = gca_attention_forward(
            q, k, v, weights_f, indices, chunk_size=chunk_size, sm_scale=sm_scale,
            softmax_off_by_one=softmax_off_by_one, landmark_null_slot=landmark_null_slot,
        )
        ctx.save_for_backward(q, k, v, weights_f, indices, lse)
        ctx.options = (chunk_size, sm_scale, softmax_off_by_one, landmark_null_slot)
        ctx.weights_dtype = weights.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        from .triton_attention import gca_attention_backward

        q, k, v, weights, indices, lse = ctx.saved_tensors
        chunk_size, sm_scale, softmax_off_by_one, landmark_null_slot = ctx.options
        dq, dk, dv, dw = gca_attention_backward(
            do.contiguous(), q, k, v, weights, indices, lse, chunk_size=chunk_size, sm_scale=sm_scale,
            softmax_off_by_one=softmax_off_by_one, landmark_null_slot=landmark_null_slot,
        )
        return dq, dk, dv, dw.to(ctx.weights_dtype), None, None, None, None, None


def gca_attention(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Grouped Cross Attention, training form.

    q: [B, L, Hq, D]; k, v: [B, Lkv, Hk, D] (chunk e = rows [e*S, (e+1)*S); a trailing partial chunk is masked);
    weights, indices: [B, ceil(L/S), K], the selection serving each QUERY chunk (made by the previous chunk's
    landmark: see `selection_for_query_chunks`); indices < 0 (-1) or >= ceil(Lkv/S) are empty slots: skipped,
    whatever their weight, with weight gradient 0.
    Every token of query chunk c attends to each selected chunk with its own softmax (stage 1); the per-chunk
    outputs are summed with the weights (stage 2). `softmax_off_by_one` adds a null logit 0 to every per-chunk
    softmax; `landmark_null_slot` treats the last row of every chunk as a zero K/V slot (DRT's landmark).
    Returns o: [B, L, Hq, D] in q's dtype; gradients reach q, k, v and weights (packed documents need no extra
    argument here: the selection, built with cu_seqlens, never crosses a document).
    """
    _check_shapes(q, k, v, chunk_size)
    B, L = q.shape[:2]
    num_q_chunks = -(-L // chunk_size)
    if indices.dim() != 3 or indices.shape[:2] != (B, num_q_chunks) or weights.shape != indices.shape:
        raise ValueError(
            f"indices and weights must be [B, ceil(L/S), K] = [{B}, {num_q_chunks}, K], got "
            f"{tuple(indices.shape)} and {tuple(weights.shape)}"
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not _use_triton(backend, chunk_size, q, k, v):
        return gca_attention_reference(
            q, k, v, weights, indices, chunk_size=chunk_size, sm_scale=scale,
            softmax_off_by_one=softmax_off_by_one, landmark_null_slot=landmark_null_slot,
        )
    return _GCAAttention.apply(q, k, v, weights, indices, chunk_size, scale, softmax_off_by_one, landmark_null_slot)


def gca_decode(
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
    backend: str = "auto",
) -> torch.Tensor:
    """GCA for a few new tokens (decode, no gradient): q [B, T, Hq, D] (T = 1 or 2 typically) against the cached
    chunk K/V [B, Lc, Hk, D]. weights/indices: [B, K] (one selection shared by the T tokens, the usual case: the
    tokens lie in one chunk) or [B, T, K]; indices < 0 or >= ceil(Lc/S) are empty slots. Returns o [B, T, Hq, D]
    (zeros with an empty cache, Lc = 0).
    """
    _check_shapes(q, k_cache, v_cache, chunk_size)
    B, T = q.shape[:2]
    if indices.dim() == 2:
        indices, weights = indices[:, None].expand(B, T, -1), weights[:, None].expand(B, T, -1)
    if indices.dim() != 3 or indices.shape[:2] != (B, T) or weights.shape != indices.shape:
        raise ValueError(
            f"indices/weights must be [B, K] or [B, T, K] with B={B}, T={T}, got {tuple(indices.shape)} and "
            f"{tuple(weights.shape)}"
        )
    if k_cache.shape[1] == 0:  # no complete chunk yet (the first tokens of a generation): every slot is empty
        return torch.zeros_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if not _use_triton(backend, chunk_size, q, k_cache, v_cache):
        return gca_decode_reference(
            q, k_cache, v_cache, weights, indices, chunk_size=chunk_size, sm_scale=scale,
            softmax_off_by_one=softmax_off_by_one, landmark_null_slot=landmark_null_slot,
        )
    from .triton_decode import gca_decode_triton

    return gca_decode_triton(
        q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), weights.float().contiguous(),
        indices.to(torch.int32).contiguous(), chunk_size=chunk_size, sm_scale=scale,
        softmax_off_by_one=softmax_off_by_one, landmark_null_slot=landmark_null_slot,
    )
