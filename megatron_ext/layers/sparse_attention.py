"""HSA and GCA attention modules: thin megatron modules over ``megatron_ext.kernels``.

They fill the ``cross_attention`` slot of :class:`~megatron_ext.layers.retrieval_layer.RetrievalTransformerLayer`:
queries come from this layer's hidden state, keys/values from the chunk memory (``context``), and the chunks from
the group's :class:`Selection`.

* :class:`HSAAttention`: q = W_q x (Hq heads, per-head RMSNorm with ``hsa_qk_norm``), NoPE; every query head of a
  KV group attends to each selected chunk of the shared memory separately and the per-chunk outputs are summed with
  the retrieval weights (``hsa_attention``); then W_o.
* :class:`GCAAttention`: q = W_q x; all tokens of query chunk c attend to the chunks selected for c, with the
  group's own K/V (``gca_attention``, landmark row as a zero K/V slot); then W_o.

Both return ``(output [s, b, h], bias)`` like megatron's attention modules.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.module import MegatronModule

from megatron_ext.layers.chunk_encoder import _tp_world
from megatron_ext.layers.chunk_memory import ChunkMemory, without_sequence_parallel
from megatron_ext.layers.norms import RMSNorm
from megatron_ext.parallel.tensor import sum_gradient_over_tp

__all__ = ["HSAAttention", "GCAAttention"]


class _ChunkCrossAttention(MegatronModule):
    def __init__(self, config, layer_number: int, pg_collection=None, qk_norm: bool = False):
        config = without_sequence_parallel(config)  # runs on the gathered sequence (see RetrievalTransformerLayer)
        super().__init__(config=config)
        self.layer_number = layer_number
        self.head_dim = config.kv_channels
        _, tp_size = _tp_world(pg_collection)
        self.heads_local = config.num_attention_heads // tp_size
        self.chunk_size = config.hsa_chunk_size
        self.backend = config.hsa_kernel_backend
        tp_group = pg_collection.tp if pg_collection is not None else None
        self._grad_tp_group = tp_group
        width = config.num_attention_heads * self.head_dim
        self.query_proj = ColumnParallelLinear(
            config.hidden_size, width, config=config, init_method=config.init_method, bias=False,
            gather_output=False, skip_bias_add=True, tp_group=tp_group,
        )
        self.query_norm = RMSNorm(config, self.head_dim, eps=config.layernorm_epsilon) if qk_norm else None
        self.output_proj = RowParallelLinear(
            width, config.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=config.add_bias_linear, input_is_parallel=True, skip_bias_add=True, tp_group=tp_group,
        )

    def _queries(self, hidden: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> batch-first [b, s, Hq_local, D]."""
        s, b, _ = hidden.shape
        q, _ = self.query_proj(hidden)
        q = q.reshape(s, b, self.heads_local, self.head_dim)
        if self.query_norm is not None:  # one norm weight for all heads, this rank's heads only: sum over TP
            q = self.query_norm.normalize(q, sum_gradient_over_tp(self.query_norm.weight, self._grad_tp_group))
        return q.transpose(0, 1).contiguous()

    def _output(self, o: torch.Tensor):
        """batch-first [b, s, Hq_local, D] -> (out [s, b, h], bias)."""
        b, s = o.shape[:2]
        return self.output_proj(o.transpose(0, 1).reshape(s, b, self.heads_local * self.head_dim))

    @staticmethod
    def _need_selection(memory, layer_number):
        if not isinstance(memory, ChunkMemory) or memory.selection is None:
            raise RuntimeError(
                f"layer {layer_number}: no chunk memory/selection reached this retrieval layer; the first retrieval "
                f"layer of the model builds the memory and each group's first layer retrieves"
            )
        return memory.selection


class HSAAttention(_ChunkCrossAttention):
    def __init__(self, config, layer_number: int = 1, pg_collection=None, **kwargs):
        super().__init__(config, layer_number, pg_collection, qk_norm=config.hsa_qk_norm)
        self.softmax_off_by_one = config.hsa_softmax_off_by_one

    def forward(self, hidden: torch.Tensor, memory: ChunkMemory):
        from megatron_ext.kernels.hsa import hsa_attention

        selection = self._need_selection(memory, self.layer_number)
        q = self._queries(hidden)
        k, v, w, idx = memory.keys.to(q.dtype), memory.values.to(q.dtype), selection.weights, selection.indices
        b, s = q.shape[:2]
        if memory.cu_seqlens is not None:  # packed: chunk ids are flat (b*C + c), so is the memory
            q, k, v = (t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v))
            w, idx = (t.reshape(1, b * s, *t.shape[2:]) for t in (w, idx))
        o = hsa_attention(q, k, v, w, idx, chunk_size=self.chunk_size, softmax_off_by_one=self.softmax_off_by_one,
                          backend=self.backend)
        return self._output(o.reshape(b, s, *o.shape[2:]))


class GCAAttention(_ChunkCrossAttention):
    def __init__(self, config, layer_number: int = 1, pg_collection=None, **kwargs):
        super().__init__(config, layer_number, pg_collection, qk_norm=False)
        self.softmax_off_by_one = config.gca_softmax_off_by_one
        self.landmark_null_slot = config.gca_landmark_null_slot

    def forward(self, hidden: torch.Tensor, memory: ChunkMemory):
        from megatron_ext.kernels.gca import gca_attention

        selection = self._need_selection(memory, self.layer_number)
        q = self._queries(hidden)
        k, v = selection.keys.to(q.dtype), selection.values.to(q.dtype)
        b, s = q.shape[:2]
        if memory.cu_seqlens is not None:  # packed: selection is already flat [1, b*C, K]
            q, k, v = (t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v))
        o = gca_attention(
            q, k, v, selection.weights, selection.indices, chunk_size=self.chunk_size,
            softmax_off_by_one=self.softmax_off_by_one, landmark_null_slot=self.landmark_null_slot,
            backend=self.backend,
        )
        return self._output(o.reshape(b, s, *o.shape[2:]))
