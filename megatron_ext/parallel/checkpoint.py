"""Checkpoint sharding for modules that megatron-core's default would get wrong.

``MegatronModule.sharded_state_dict`` asks each child for its own sharded state dict, and a child without one (a plain
``torch.nn.ModuleList``, ``ModuleDict`` or ``Sequential``) is saved as if every tensor below it were replicated over
tensor parallelism, with its *local* shape. Tensor-parallel layers inside such a container (e.g. the transformer
layers of the chunk encoder) then get a different global shape at every TP size, and the checkpoint cannot be
resharded. :func:`sharded_state_dict_through_containers` recurses through those containers instead.
"""

from __future__ import annotations

import torch

__all__ = ["sharded_state_dict_through_containers"]

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def sharded_state_dict_through_containers(module, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
    """``MegatronModule.sharded_state_dict`` for ``module``, looking through plain containers for the modules that
    know their own sharding (megatron layers, ColumnParallelLinear, ...). Use it as a module's ``sharded_state_dict``.
    """
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import (
        ensure_metadata_has_dp_cp_group,
        make_sharded_tensors_for_checkpoint,
        sharded_state_dict_default,
    )

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    own: dict = {}
    module._save_to_state_dict(own, "", keep_vars=True)  # this module's own parameters: replicated
    tp_group = getattr(module, "tp_group", None) or parallel_state.get_tensor_model_parallel_group()
    sharded = make_sharded_tensors_for_checkpoint(
        own, prefix, sharded_offsets=sharded_offsets, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"]
    )
    for name, child in module.named_children():
        child_prefix = f"{prefix}{name}."
        if isinstance(child, _CONTAINERS):
            sharded.update(sharded_state_dict_through_containers(child, child_prefix, sharded_offsets, metadata))
        else:
            sharded.update(sharded_state_dict_default(child, child_prefix, sharded_offsets, metadata, tp_group=tp_group))
    return sharded
