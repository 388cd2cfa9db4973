"""The retrieval transformer layer (HSA or GCA) with the bypass residual.

Built from megatron's ``TransformerLayerSubmodules`` slots plus two of its own:

    chunk_memory            (first retrieval layer only) x -> ChunkMemory              (chunk encoder, K/V, landmarks)
    retrieval               (first layer of each group)  x, memory -> Selection        (top-k chunks and weights)
    input_layernorm, self_attention     optional inner SWA:   x <- x + SWA(norm x)      (HSA's hsa_inner_swa; GCA always)
    pre_cross_attn_layernorm, cross_attention   a = HSA/GCA(norm x, memory)
    pre_mlp_layernorm, mlp  bypass residual (default):  out = x + MLP(norm(x + a))
                            plain residual:             x <- x + a;  out = x + MLP(norm x)

The chunk memory arrives and leaves as megatron's ``context`` (``TransformerBlock`` threads it through the layers),
so the hand-off from the memory layer to every retrieval layer above is one explicit object. Packed batches
(``packed_seq_params``, see ``layers/packing.py``) put their document offsets into the memory, so every retrieval
above stays inside the token's document. Under sequence parallelism the layer gathers the sequence for the chunk
memory, retrieval and HSA/GCA (plain tensor-parallel modules) and scatters the HSA/GCA output back; the inner SWA
and the MLP run sequence-parallel as in megatron's own layers.
Retrieval and the chunk encoder read the layer's *input* x, as in the reference models (the retrieval layer and
the chunking layer sit before the HSA layer and see the same hidden state).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Optional, Union

from megatron.core import tensor_parallel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.layers.chunk_memory import ChunkMemory
from megatron_ext.layers.layer_recompute import LayerRecompute
from megatron_ext.layers.packing import flat_cu_seqlens

__all__ = ["RetrievalLayerSubmodules", "RetrievalTransformerLayer"]


@dataclass
class RetrievalLayerSubmodules(TransformerLayerSubmodules):
    chunk_memory: Optional[Union[ModuleSpec, type]] = None
    retrieval: Optional[Union[ModuleSpec, type]] = None


class RetrievalTransformerLayer(LayerRecompute, TransformerLayer):
    """A TransformerLayer whose ``cross_attention`` slot holds HSA or GCA over the chunk memory (recomputing itself
    under the per-layer full recomputation, see ``layers/layer_recompute.py``)."""

    def __init__(self, config, submodules: RetrievalLayerSubmodules, layer_number: int = 1,
                 group: Optional[int] = None, **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number, **kwargs)
        self.group = group
        self.bypass_residual = bool(config.hsa_bypass_residual)
        common = dict(config=config, layer_number=self.layer_number, pg_collection=self.pg_collection)
        self.chunk_memory = build_module(submodules.chunk_memory, **common) if submodules.chunk_memory else None
        self.retrieval = build_module(submodules.retrieval, **common) if submodules.retrieval else None
        self.has_inner_attention = not isinstance(self.self_attention, IdentityOp)
        self._setup_recompute(config, layer_number)

    def _gather_sequence(self, x):
        """Sequence parallelism: the whole sequence on every rank. The modules fed with it are plain TP modules
        whose input gradients are already complete on every rank, so the backward only keeps this rank's slice."""
        if not self.config.sequence_parallel:
            return x
        return gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False, group=self.pg_collection.tp)

    def forward(self, hidden_states, context=None, **kwargs):
        return self._run(self._forward, hidden_states, context, kwargs)

    def _forward(self, hidden_states, attention_mask=None, context=None, context_mask=None, rotary_pos_emb=None,
                 rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None, attention_bias=None,
                 inference_context=None, packed_seq_params=None, sequence_len_offset=None, padding_mask=None,
                 **kwargs):
        if inference_context is not None:
            raise NotImplementedError("retrieval layers have no megatron inference path; use the kernels' *_decode")
        x = hidden_states  # [s/TP, b, h] under sequence parallelism, else [s, b, h]
        x_full = self._gather_sequence(x)
        if self.chunk_memory is not None:
            cu = flat_cu_seqlens(packed_seq_params, x_full.shape[1], x_full.shape[0], x.device)
            memory = dataclasses.replace(self.chunk_memory(x_full), cu_seqlens=cu)
        else:
            memory = context
        if not isinstance(memory, ChunkMemory):
            raise RuntimeError(
                f"layer {self.layer_number}: expected the chunk memory as `context`, got {type(memory).__name__}; "
                f"a retrieval layer above the first one must receive it from the layers below"
            )
        if self.retrieval is not None:
            memory = memory.with_selection(self.retrieval(x_full, memory), self.group)
        elif memory.group != self.group:
            raise RuntimeError(f"layer {self.layer_number}: group {self.group} has no retrieval of its own")

        if self.has_inner_attention:  # x <- x + SWA(norm x)
            if self.recompute_input_layernorm:  # selective recompute of 'layernorm', as megatron's own layers do
                self.input_layernorm_checkpoint = tensor_parallel.CheckpointWithoutOutput()
                normed = self.input_layernorm_checkpoint.checkpoint(self.input_layernorm, x)
            else:
                normed = self.input_layernorm(x)
            attn = self.self_attention(
                normed, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin, packed_seq_params=packed_seq_params,
            )
            if self.recompute_input_layernorm:
                self.input_layernorm_checkpoint.discard_output_and_register_recompute(attn[0])
            with self.bias_dropout_add_exec_handler():
                x = self.self_attn_bda(self.training, self.config.bias_dropout_fusion)(attn, x, self.hidden_dropout)

        out, bias = self.cross_attention(self._gather_sequence(self.pre_cross_attn_layernorm(x)), memory)
        if bias is not None:
            out = out + bias
        if self.config.sequence_parallel:  # back to this rank's slice of the sequence
            out = scatter_to_sequence_parallel_region(out, group=self.pg_collection.tp)
        if self.bypass_residual:  # the retrieval output reaches the residual stream only through the MLP
            residual, mlp_input = x, x + out
        else:
            x = x + out
            residual, mlp_input = x, x
        normed = self._forward_pre_mlp_layernorm(mlp_input)  # recomputes the norm under selective 'layernorm'
        mlp = functools.partial(self.mlp, padding_mask=padding_mask)
        if self.recompute_mlp:  # selective recompute of 'mlp' (dense MLPs; MoE layers recompute inside)
            mlp_output_with_bias = tensor_parallel.checkpoint(mlp, False, normed)
        else:
            mlp_output_with_bias = mlp(normed)
        return self._forward_post_mlp(mlp_output_with_bias, residual), memory
