"""HSA decode: one new token per sequence against cached chunk K/V and landmarks (inference, no autograd).

Retrieval for one token is a [C]-long score vector per retrieval head, so it is done with PyTorch ops on the
reference's ``decode_retrieval``; the attention runs the Triton token-schedule forward kernel with L = 1.
"""

from __future__ import annotations

import torch

from megatron_ext.kernels.hsa.attention import hsa_attention_forward
from megatron_ext.kernels.hsa.reference import decode_retrieval

__all__ = ["decode_triton"]


@torch.no_grad()
def decode_triton(
    q, q_r, k_cache, v_cache, landmarks, positions, *, chunk_size, topk, weight_rule, rank_decay, sm_scale,
    softmax_off_by_one,
):
    """``hsa_decode`` on the Triton kernels; the inputs are checked there."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    indices, weights = decode_retrieval(
        q_r, landmarks, positions, chunk_size=chunk_size, topk=topk, weight_rule=weight_rule, rank_decay=rank_decay
    )
    indices = indices.expand(B, Hk, topk).to(torch.int32).contiguous()
    weights = weights.expand(B, Hk, topk).contiguous()
    scale = D**-0.5 if sm_scale is None else float(sm_scale)
    o, _, _ = hsa_attention_forward(
        q[:, None].contiguous(), k_cache.contiguous(), v_cache.contiguous(), weights[:, None], indices[:, None],
        chunk_size, scale, softmax_off_by_one, "token",
    )
    return o[:, 0], indices, weights
