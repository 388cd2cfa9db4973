"""Layout-independent views of a model's weights and gradients, through megatron-core's sharded state dict.

``model.sharded_state_dict()`` already says, for every parameter, where this rank's tensor sits in the global
(single-device) tensor: ``ShardedTensor(global_shape, global_offset, replica_id)`` (and factories for the fused
SwiGLU ``linear_fc1``). :func:`gather_global_tensors` uses exactly that map to assemble the full tensors of a model
split by any TP/EP/PP/CP layout, keyed by checkpoint key. Two layouts compute the same model iff these dicts match,
which is how ``tests/parallel`` compares layouts; the same keys are those of a ``torch_dist`` checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

__all__ = ["gather_global_tensors", "replica_mismatches", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DistributedDataParallel / Float16Module wrappers (anything with a ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _param_gradient(param: torch.nn.Parameter) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)  # megatron DDP accumulates into main_grad
    return grad if grad is not None else param.grad


def _leaves(tree) -> Iterable:
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


def _local_shards(model_chunks, source: str, replicas: bool = False) -> list:
    """This rank's main-replica ShardedTensors (all replicas if ``replicas``), ``data`` = the parameter or gradient."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    params = {}
    for chunk in model_chunks:
        for p in chunk.parameters():
            params[id(p)] = p
    shards = []
    for chunk in model_chunks:
        for item in _leaves(unwrap_model(chunk).sharded_state_dict()):
            if not isinstance(item, (ShardedTensor, ShardedTensorFactory)) or item.data is None:
                continue  # ShardedObjects (extra state), plain values
            param = params.get(id(item.data))
            if param is None:
                continue  # buffers (e.g. the MoE expert bias): not parameters, no gradient
            if source == "grad":
                grad = _param_gradient(param)
                if grad is None:
                    continue
                item = dataclasses.replace(item, data=grad.detach().view(param.shape))
            else:
                item = dataclasses.replace(item, data=param.detach())
            # a factory (the fused SwiGLU fc1) slices its data into global pieces; it does the same to a gradient
            built = list(_leaves(item.build())) if isinstance(item, ShardedTensorFactory) else [item]
            for sh in built:
                if sh.flattened_range is not None:
                    raise NotImplementedError(f"{sh.key}: flattened shards (distributed-optimizer state) are not handled")
                if replicas or is_main_replica(sh.replica_id):
                    shards.append(sh)
    return shards


def gather_global_tensors(model_chunks, source: str = "param", group=None) -> dict[str, torch.Tensor]:
    """Full (unsharded) fp32 CPU tensors of every parameter (``source="param"``) or gradient (``"grad"``).

    model_chunks: the model (or list of virtual-pipeline chunks) on this rank, wrapped or not.
    Collective over ``group`` (default: the whole world): every rank gets the same dict, keyed by checkpoint key.
    Gradients are read after ``finalize_model_grads`` (``param.main_grad`` under megatron DDP).
    """
    if source not in ("param", "grad"):
        raise ValueError(f"source must be 'param' or 'grad', got {source!r}")
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    shards = _local_shards(model_chunks, source)
    local_shapes = {s.key: tuple(s.global_shape) for s in shards}
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    all_shapes: dict[str, tuple] = {}
    if distributed:
        gathered = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, local_shapes, group=group)
    else:
        gathered = [local_shapes]
    for shapes in gathered:
        for key, shape in shapes.items():
            if all_shapes.setdefault(key, shape) != shape:
                raise RuntimeError(f"{key}: ranks disagree on the global shape ({all_shapes[key]} vs {shape})")
    keys = sorted(all_shapes)
    device = shards[0].data.device if shards else torch.device("cpu")
    numels = [int(torch.Size(all_shapes[k]).numel()) for k in keys]
    flat = torch.zeros(sum(numels), dtype=torch.float32, device=device)
    views = dict(zip(keys, (v.view(all_shapes[k]) for k, v in zip(keys, flat.split(numels)))))
    for s in shards:
        views[s.key][s.global_slice()] = s.data.float()  # prepended axes are indexed by ints: shapes match
    if distributed:
        torch.distributed.all_reduce(flat, group=group)
    flat = flat.cpu()
    return {k: v.view(all_shapes[k]).clone() for k, v in zip(keys, flat.split(numels))}


def replica_mismatches(model_chunks, global_tensors: dict[str, torch.Tensor], source: str = "param", group=None):
    """{key: largest relative difference} between any rank's copy of a tensor and ``global_tensors`` (from
    :func:`gather_global_tensors`, which reads main replicas only), for keys that differ by more than 0.

    A replicated gradient that a layout forgot to all-reduce (a norm under sequence parallelism, a router) shows up
    here even when the main replica is right. Collective over ``group``.
    """
    if isinstance(model_chunks, torch.nn.Module):
        model_chunks = [model_chunks]
    worst: dict[str, float] = {}
    for sh in _local_shards(model_chunks, source, replicas=True):
        ref = global_tensors[sh.key][sh.global_slice()]
        err = ((sh.data.float().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        if err > 0:
            worst[sh.key] = max(worst.get(sh.key, 0.0), err)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(gathered, worst, group=group)
        worst = {}
        for part in gathered:
            for k, v in part.items():
                worst[k] = max(worst.get(k, 0.0), v)
    return worst
