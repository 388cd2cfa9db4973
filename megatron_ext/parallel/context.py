"""Context parallelism for retrieval models: the sequence split, and gathers that carry gradients.

megatron-core splits a sequence over the CP group in 2*CP pieces and gives rank r the pieces r and 2*CP-1-r (so
causal work is balanced); its RoPE assumes exactly this layout. We keep it, and require every piece to hold whole
chunks, so that chunk boundaries never fall on a split: the chunk encoder then runs on local chunks unchanged.

What crosses ranks:

* the chunk memory (encoder K/V and landmarks, or GCA's encoder output): :func:`gather_sequence` puts the local
  chunks of every rank back in global order (all-gather; the backward all-reduces the gradient and keeps this rank's
  pieces, so each rank's chunks receive the gradient of every query that read them);
* the retrieval queries, so that retrieval runs on global positions (chunk c is eligible for token t iff
  (c+1)*S <= t, with t global) and each rank keeps its rows (:func:`local_rows`);
* SWA keys/values (the window reaches into other ranks' pieces), with queries at their global positions
  (:func:`global_positions`).
"""

from __future__ import annotations

import torch

__all__ = [
    "cp_world",
    "global_positions",
    "split_for_context_parallel",
    "gather_sequence",
    "local_rows",
    "batch_for_this_cp_rank",
]


def cp_world(cp_group=None) -> tuple[int, int]:
    """(rank, size) in the context-parallel group (megatron's global one when ``cp_group`` is None)."""
    if cp_group is not None:
        return cp_group.rank(), cp_group.size()
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():  # plain single-process use (tools, unit tests)
        return 0, 1
    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()


def _pieces(seq_len: int, cp_size: int) -> int:
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"context parallelism splits a sequence in 2*CP={2 * cp_size} pieces: seq_length={seq_len} must be a "
            f"multiple of {2 * cp_size}"
        )
    return seq_len // (2 * cp_size)


def global_positions(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions [seq_len / cp] of this rank's tokens, in local order (pieces r and 2*CP-1-r)."""
    piece = _pieces(seq_len, cp_size)
    starts = (cp_rank * piece, (2 * cp_size - 1 - cp_rank) * piece)
    return torch.cat([torch.arange(s, s + piece, device=device) for s in starts])


def split_for_context_parallel(x: torch.Tensor, dim: int, cp_rank: int, cp_size: int, chunk_size: int = 1):
    """This rank's part of a full sequence tensor along ``dim`` (megatron's layout). ``chunk_size``: each piece
    must hold whole chunks (HSA/GCA chunk size), else a clear error."""
    if cp_size == 1:
        return x
    piece = _pieces(x.shape[dim], cp_size)
    if piece % chunk_size:
        raise ValueError(
            f"context parallelism: each of the 2*CP={2 * cp_size} sequence pieces has {piece} tokens, not a multiple "
            f"of hsa_chunk_size={chunk_size}; use seq_length a multiple of {2 * cp_size * chunk_size}"
        )
    parts = x.split(piece, dim=dim)
    return torch.cat([parts[cp_rank], parts[2 * cp_size - 1 - cp_rank]], dim=dim)


def _global_order(pieces_by_rank: list[torch.Tensor], dim: int) -> torch.Tensor:
    """[rank r's local tensor] -> the full sequence: rank r holds pieces r and 2*CP-1-r."""
    cp = len(pieces_by_rank)
    halves = [t.chunk(2, dim=dim) for t in pieces_by_rank]
    ordered = [halves[i][0] for i in range(cp)] + [halves[cp - 1 - i][1] for i in range(cp)]
    return torch.cat(ordered, dim=dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        rank, size = cp_world(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        ctx.dim, ctx.group, ctx.rank, ctx.size = dim, group, rank, size
        return _global_order(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)  # every rank's queries read every rank's chunks
        local = split_for_context_parallel(grad, ctx.dim, ctx.rank, ctx.size)
        return local, None, None


def gather_sequence(x: torch.Tensor, dim: int, cp_group=None) -> torch.Tensor:
    """All CP ranks' parts of a sequence tensor, in global order along ``dim`` (identity without CP).

    Differentiable: the gradient of the gathered tensor is summed over the CP group and each rank keeps the part of
    its own pieces.
    """
    _, size = cp_world(cp_group)
    if size == 1:
        return x
    if cp_group is None:
        from megatron.core import parallel_state

        cp_group = parallel_state.get_context_parallel_group()
    return _GatherSequence.apply(x, dim, cp_group)


def local_rows(x: torch.Tensor, dim: int, cp_group=None, chunk_size: int = 1) -> torch.Tensor:
    """This rank's rows of a full-sequence tensor computed identically on every CP rank (no communication)."""
    rank, size = cp_world(cp_group)
    return split_for_context_parallel(x, dim, rank, size, chunk_size)


def batch_for_this_cp_rank(batch: dict, cp_group=None) -> dict:
    """A training micro-batch cut to this CP rank's two pieces (megatron's layout, as its RoPE expects).

    batch: tokens/labels/loss_mask/position_ids [b, s] (sliced along s), attention_mask None, packed_seq_params None
    (packed documents under CP are not supported: a clear error). Identity without CP.
    """
    rank, size = cp_world(cp_group)
    if size == 1:
        return batch
    if batch.get("packed_seq_params") is not None or batch.get("attention_mask") is not None:
        raise ValueError("context parallelism takes unpacked samples without dense attention masks here: drop "
                         "packing (or the attention mask) or set context_parallel_size=1")
    out = dict(batch)
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        if out.get(key) is not None:
            out[key] = split_for_context_parallel(out[key], 1, rank, size)
    return out
