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

from megatron_ext.layers.norms import RMSNorm

__all__ = ["sum_gradient_over_tp", "tp_world", "local_kv_heads", "kv_head_partition", "ReplicatedLinear",
           "TPSummedRMSNorm"]


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


def kv_head_partition(num_kv_heads: int, tp_group=None) -> tuple[int, int, bool]:
    """(first KV head, count, replicated) of this TP rank's share of the chunk memory's KV heads.

    Hk >= TP: a contiguous block of Hk/TP heads (a KV group never spans ranks). Hk < TP (e.g. one HSA KV head at
    TP=2): every KV head is replicated on TP/Hk ranks, and each of those ranks computes it and keeps it, serving its
    own Hq/TP query heads (all of one KV group, since TP is a multiple of Hk).
    """
    rank, size = tp_world(tp_group)
    if num_kv_heads >= size:
        block = local_kv_heads(num_kv_heads, tp_group)
        return block.start, block.stop - block.start, False
    if size % num_kv_heads:
        raise ValueError(
            f"{num_kv_heads} KV heads and tensor_model_parallel_size={size}: with fewer KV heads than ranks, TP must "
            f"be a multiple of the KV heads (each KV head is then replicated on TP/Hk ranks)"
        )
    return rank * num_kv_heads // size, 1, True


class ReplicatedLinear(torch.nn.Module):
    """y = x W^T with W replicated on every TP rank (megatron's linear call convention: returns (y, None)).

    For projections that cannot be split over TP (fewer KV heads than ranks). The caller sums the output's gradient
    over TP (:func:`sum_gradient_over_tp`) if each rank uses only part of it. The weight is initialised from the
    default generator, which megatron seeds identically on the ranks of a TP group, like a CPU-initialised
    ColumnParallelLinear's full weight; its checkpoint key and shape equal a ColumnParallelLinear's at TP=1.
    """

    def __init__(self, input_size: int, output_size: int, *, config, init_method, bias: bool = False, **kwargs):
        super().__init__()
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else "cuda"
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype, device=device))
        if config.perform_initialization:
            init_method(self.weight)
        self.bias = torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.linear(x, self.weight, self.bias), None

    # megatron's linears carry an (empty) extra state; so does this one, so that its checkpoint entries are the
    # same as a ColumnParallelLinear's and a checkpoint moves between TP sizes where one or the other is used.
    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass


class TPSummedRMSNorm(RMSNorm):
    """A per-head RMSNorm over this rank's heads whose weight gradient is summed over TP in the graph.

    For QK-norms that megatron's ``finalize_model_grads`` does not sum: it sums parameters named
    ``q_layernorm``/``k_layernorm`` only when the *model's* config has ``qk_layernorm``, so the chunk encoder's QK-norm
    (``hsa_qk_norm``) of a model without decoder QK-norm needs this instead.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, sum_gradient_over_tp(self.weight))
