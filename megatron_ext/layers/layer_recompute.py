"""Full activation recomputation layer by layer, for models whose layers hand the chunk memory up as ``context``.

megatron's ``--recompute-granularity full`` recomputes in ``TransformerBlock``: it checkpoints runs of layers with
``context`` among the checkpoint's saved inputs, which must be tensors. A retrieval model's ``context`` is the chunk
memory, a dataclass of tensors whose gradients must reach the layer that built it. For these models ``HSAConfig``
gives 'full' to the layers instead (``layer_recompute_method`` / ``layer_recompute_num_layers``, and megatron's own
fields cleared so that the block runs its layers plainly): each layer that megatron's method names runs its forward
under megatron's ``tensor_parallel.checkpoint`` (the same RNG bookkeeping, so Gumbel noise and dropout repeat), with
the memory's tensors as plain inputs and outputs of the checkpoint (``encode_memory``), so their gradients flow from
the layers that read the memory back into the recomputation of the layer that built it.

'uniform' with one layer per unit and 'block' (the first N layers of each pipeline stage) keep megatron's meaning;
'uniform' with several layers per unit (one saved input per unit) is refused by the config.
"""

from __future__ import annotations

from typing import Callable

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_ext.layers.chunk_memory import decode_memory, encode_memory

__all__ = ["LayerRecompute", "RecomputingTransformerLayer", "layer_recomputes"]


def layer_recomputes(config, local_layer_number: int) -> bool:
    """Whether the layer ``local_layer_number`` (1-based within its pipeline stage) recomputes itself."""
    method = getattr(config, "layer_recompute_method", None)
    if method == "uniform":
        return True
    return method == "block" and local_layer_number <= config.layer_recompute_num_layers


class LayerRecompute:
    """Mixin of a ``TransformerLayer`` subclass: ``_run(forward, hidden_states, context, kwargs)`` calls ``forward``
    directly, or under a checkpoint when this layer recomputes itself in training."""

    def _setup_recompute(self, config, local_layer_number: int) -> None:
        self.recomputes_itself = layer_recomputes(config, local_layer_number)

    def _run(self, forward: Callable, hidden_states, context, kwargs):
        if not (self.recomputes_itself and self.training and torch.is_grad_enabled()):
            return forward(hidden_states, context=context, **kwargs)
        spec_in, tensors_in = encode_memory(context)
        spec_out = []

        def run(hidden, *tensors):
            out, memory = forward(hidden, context=decode_memory(spec_in, tensors), **kwargs)
            spec, flat = encode_memory(memory)
            spec_out[:] = [spec]  # the same structure on every run; the forward's is read below
            return (out, *flat)

        out, *flat = tensor_parallel.checkpoint(
            run, self.config.distribute_saved_activations, hidden_states, *tensors_in
        )
        return out, decode_memory(spec_out[0], flat)


class RecomputingTransformerLayer(LayerRecompute, TransformerLayer):
    """megatron's ``TransformerLayer`` (SWA / full attention, dense or MoE MLP) of a pattern model, which recomputes
    itself under the per-layer full recomputation of retrieval models (otherwise exactly ``TransformerLayer``)."""

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self._setup_recompute(config, layer_number)

    def forward(self, hidden_states, context=None, **kwargs):
        return self._run(super().forward, hidden_states, context, kwargs)
