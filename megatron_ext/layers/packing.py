"""Packed sequences (several documents per sample) in the megatron [s, b, h] layout.

The data pipeline's collate gives ``cu_seqlens [n+1]`` over the batch flattened to ``B*L`` tokens, every entry a
multiple of the chunk size. The model receives it as megatron's ``PackedSeqParams`` with ``qkv_format="sbhd"``
(the hidden states keep their [s, b, h] shape; only masks change): :func:`packed_seq_params` builds it.

* SWA/full attention: a token sees only keys of its own document (:func:`document_ids`).
* HSA/GCA: retrieval only picks chunks of the token's document; the kernels take packed input as batch 1, so the
  layers flatten [B, L] to [1, B*L] and pass ``cu_seqlens`` (with every sample start added, so nothing crosses
  samples). The chunk encoder needs nothing: documents start on chunk boundaries.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["packed_seq_params", "flat_cu_seqlens", "document_ids"]


def packed_seq_params(cu_seqlens: torch.Tensor, seq_length: int):
    """megatron ``PackedSeqParams`` for our layers: sbhd layout, one ``cu_seqlens`` for queries and keys.

    seq_length: the sample length L (not the longest document): in the sbhd layout megatron's GPTModel sizes its
    rotary table from ``max_seqlen_q``, and RoPE is applied over the whole sample (it is relative, so documents
    that start mid-sample see the same relative positions).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=int(seq_length),
                           max_seqlen_kv=int(seq_length))


def flat_cu_seqlens(params, batch: int, seq_len: int, device) -> Optional[torch.Tensor]:
    """``cu_seqlens`` over the flattened ``batch * seq_len`` tokens, with every sample start added; None if unpacked.

    Raises for the THD layout (not supported by these layers), for offsets outside the batch and for offsets out of
    order.
    """
    if params is None:
        return None
    if getattr(params, "qkv_format", "sbhd") != "sbhd":
        raise NotImplementedError(
            f"packed_seq_params.qkv_format={params.qkv_format!r}: the HSA/SWA layers take packed batches in the "
            f"sbhd layout; build them with megatron_ext.layers.packing.packed_seq_params(cu_seqlens)"
        )
    given = params.cu_seqlens_q
    if given is None:
        return None
    # Every attention layer of a step asks for the same offsets; the checks and torch.unique below each wait for
    # the GPU (a host synchronisation), so the first layer's answer is kept on the params object of the step.
    key = (given, batch, seq_len, str(device))
    cached = getattr(params, "_megatron_ext_flat_cu_seqlens", None)
    if cached is not None and cached[0][0] is given and cached[0][1:] == key[1:]:
        return cached[1]
    total = batch * seq_len
    cu = given.to(device=device, dtype=torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) > total:
        raise ValueError(f"cu_seqlens {cu.tolist()} must start at 0 and stay within the batch's {total} tokens")
    if bool((cu[1:] < cu[:-1]).any()):  # torch.unique below would sort them into other documents
        raise ValueError(f"cu_seqlens {cu.tolist()} must be non-decreasing: document offsets in order")
    sample_starts = torch.arange(0, total + 1, seq_len, device=device, dtype=torch.int64)
    flat = torch.unique(torch.cat([cu, sample_starts]))  # sorted
    params._megatron_ext_flat_cu_seqlens = (key, flat)
    return flat


def document_ids(cu: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[batch, seq_len] int64: the index of each token's document (from a flat ``cu_seqlens``)."""
    positions = torch.arange(batch * seq_len, device=cu.device)
    return (torch.searchsorted(cu[1:], positions, right=True)).reshape(batch, seq_len)
