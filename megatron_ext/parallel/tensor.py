"""Tensor-parallel helpers for the HSA/GCA layers.

HSA and GCA shard by KV-head groups: a rank owns Hk/TP memory KV heads and the query heads that read them, while
the retrieval (landmarks, retrieval queries, top-k and weights) is computed in full on every rank, because the
selection of a KV head depends on the whole retrieval head. Such replicated work is then *used* only in part on
each rank (its KV heads' weights, its heads through a shared per-head norm), so its gradient is partial per rank.
:func:`sum_gradient_over_tp` marks the point where the partial use begins: identity forward, gradient summed over
the TP group in backward. Everything upstream then gets the full gradient on every rank and the replicated weights
stay identical without any extra all-reduce in ``finalize_model_grads``.
"""

from __future__ import annotations

import torch

__all__ = ["sum_gradient_over_tp", "tp_world", "local_kv_heads"]


def tp_world(tp_group=None) -> tuple[int, int]:
    """(rank, size) in the tensor-parallel group (megatron's global one when ``tp_group`` is None)."""
    if tp_group is not None:
        return tp_group.rank(), tp_group.size()
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


def sum_gradient_over_tp(tensor: torch.Tensor, tp_group=None) -> torch.Tensor:
    """Identity in forward; all-reduce (sum) of the gradient over the TP group in backward.

    Apply it to a tensor that every TP rank holds in full (replicated) right before each rank uses only its share.
    """
    _, size = tp_world(tp_group)
    if size == 1 or not tensor.requires_grad:
        return tensor
    from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(tensor, group=tp_group)


def local_kv_heads(num_kv_heads: int, tp_group=None) -> slice:
    """The KV heads this TP rank owns: a contiguous block of num_kv_heads / TP (a KV group never spans ranks)."""
    rank, size = tp_world(tp_group)
    if num_kv_heads % size:
        raise ValueError(
            f"{num_kv_heads} KV heads cannot be split over tensor_model_parallel_size={size}: use a multiple of {size}"
        )
    per_rank = num_kv_heads // size
    return slice(rank * per_rank, (rank + 1) * per_rank)
