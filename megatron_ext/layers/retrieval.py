"""Retrieval modules, one per retrieval group: pick the chunks that the group's HSA/GCA layers attend to.

* :class:`HSARetrieval` (per token): q_r = W_r RMSNorm(x), R heads of Dr; scores <q_r[t], landmark[c]> / sqrt(Dr)
  over complete chunks before t's own chunk; top-k (Gumbel-perturbed in training if ``hsa_gumbel_noise``); weights
  by softmax or stick-breaking (``hsa_weight_rule``) with an optional learned rank decay; optional RMSNorm on
  queries and landmarks (``hsa_landmark_norm``). Weights are differentiable: W_r and the landmark path learn only
  through them.
* :class:`GCARetrieval` (per chunk, DRT): the query of chunk c is RMSNorm(x at c's landmark row); it selects
  chunks e < c, and that selection serves the tokens of chunk c + 1. The group also projects its own chunk K/V.

Both run the ``megatron_ext.kernels`` ops; retrieval is computed on every tensor-parallel rank (replicated) and the
rank keeps the KV heads it owns.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule

from megatron_ext.layers.chunk_encoder import _tp_world
from megatron_ext.layers.chunk_memory import ChunkMemory, Selection, without_sequence_parallel
from megatron_ext.layers.norms import RMSNorm
from megatron_ext.parallel.context import gather_sequence, local_rows
from megatron_ext.parallel.tensor import kv_head_partition, sum_gradient_over_tp

__all__ = ["HSARetrieval", "GCARetrieval"]


class _Retrieval(MegatronModule):
    """What both retrieval modules share: chunking and top-k options, the kernel backend, and the TP group over
    which the gradient of their replicated selection weights is summed. Retrieval reads whole sequences, so its
    config never has sequence parallelism."""

    def __init__(self, config, pg_collection=None):
        config = without_sequence_parallel(config)
        super().__init__(config=config)
        self.chunk_size = config.hsa_chunk_size
        self.topk = config.hsa_topk
        self.gumbel = config.hsa_gumbel_noise
        self.backend = config.hsa_kernel_backend
        self._grad_tp_group = pg_collection.tp if pg_collection is not None else None

    def _noise_seed(self, device) -> int | None:
        """Seed of this call's Gumbel noise (None without noise). Retrieval is replicated over tensor parallelism, so
        every TP rank must draw the same noise and pick the same chunks, whatever each rank's generators went through
        before: TP rank 0's draw is broadcast. Drawn from the CPU generator, which megatron's activation
        recomputation restores, so a recomputed forward picks the chunks of the first."""
        if not (self.gumbel and self.training):
            return None
        seed = torch.randint(0, 2**30, (1,), dtype=torch.int64)
        group = self._grad_tp_group
        if group is None and torch.distributed.is_initialized():
            from megatron.core import parallel_state

            group = parallel_state.get_tensor_model_parallel_group(check_initialized=False)
        if group is not None and torch.distributed.get_world_size(group) > 1:
            on_device = seed.to(device if torch.distributed.get_backend(group) == "nccl" else "cpu")
            torch.distributed.broadcast(on_device, src=torch.distributed.get_global_rank(group, 0), group=group)
            seed = on_device.cpu()
        return int(seed.item())


class HSARetrieval(_Retrieval):
    """forward(x [s, b, h], memory) -> Selection(indices/weights [b, s, Hk_local, K])."""

    def __init__(self, config, layer_number: int = 1, pg_collection=None, **kwargs):
        super().__init__(config, pg_collection)
        config = self.config
        h = config.hidden_size
        self.weight_rule = config.hsa_weight_rule
        self.retrieval_heads = config.hsa_heads
        self.retrieval_head_dim = config.hsa_retrieval_width // config.hsa_heads
        tp_group = self._grad_tp_group
        self.kv_head_start, self.kv_heads_local, _ = kv_head_partition(config.hsa_num_kv_heads, tp_group)
        self.norm = RMSNorm(config, h, eps=config.layernorm_epsilon)
        self.query_proj = ColumnParallelLinear(
            h, config.hsa_retrieval_width, config=config, init_method=config.init_method, bias=False,
            gather_output=True, skip_bias_add=True, tp_group=tp_group,
        )
        if config.hsa_landmark_norm:
            self.query_norm = RMSNorm(config, self.retrieval_head_dim, eps=config.layernorm_epsilon)
            self.landmark_norm = RMSNorm(config, self.retrieval_head_dim, eps=config.layernorm_epsilon)
        else:
            self.query_norm = self.landmark_norm = None
        # p in "logit_k += k * p": a recency bias by slot rank, learned from 0.
        self.rank_decay = torch.nn.Parameter(torch.zeros(1, dtype=torch.float32)) if config.hsa_rank_decay else None

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> Selection:
        from megatron_ext.kernels.hsa import hsa_retrieval

        s, b, _ = x.shape
        q_r, _ = self.query_proj(self.norm(x).transpose(0, 1))  # [b, s, R*Dr]
        q_r = q_r.reshape(b, s, self.retrieval_heads, self.retrieval_head_dim)
        landmarks = memory.landmarks
        if self.query_norm is not None:
            q_r, landmarks = self.query_norm(q_r), self.landmark_norm(landmarks)
        landmarks = landmarks.to(q_r.dtype)
        q_r = gather_sequence(q_r, dim=1)  # CP: retrieve at global positions (every rank, all tokens) ...
        s = q_r.shape[1]
        if memory.cu_seqlens is not None:  # packed: the kernels take one flat sequence (chunk ids become b*C + c)
            q_r, landmarks = q_r.reshape(1, b * s, *q_r.shape[2:]), landmarks.reshape(1, -1, *landmarks.shape[2:])
        indices, weights = hsa_retrieval(
            q_r.contiguous(), landmarks.contiguous(), chunk_size=self.chunk_size, topk=self.topk,
            weight_rule=self.weight_rule, gumbel=self.gumbel and self.training,
            rank_decay=self.rank_decay[0] if self.rank_decay is not None else None, cu_seqlens=memory.cu_seqlens,
            backend=self.backend, seed=self._noise_seed(q_r.device),
        )
        indices, weights = indices.reshape(b, s, *indices.shape[2:]), weights.reshape(b, s, *weights.shape[2:])
        indices, weights = local_rows(indices, dim=1), local_rows(weights, dim=1)  # ... and keep this rank's tokens
        s = indices.shape[1]
        # Replicated retrieval, used by this rank's KV heads only: sum the weights' gradient over TP.
        weights = sum_gradient_over_tp(weights, self._grad_tp_group)
        Hl = self.kv_heads_local
        if self.retrieval_heads == 1:  # one selection shared by every KV head
            indices, weights = indices.expand(b, s, Hl, -1), weights.expand(b, s, Hl, -1)
        else:  # this rank's KV heads
            lo = self.kv_head_start
            indices, weights = indices[:, :, lo : lo + Hl], weights[:, :, lo : lo + Hl]
        return Selection(indices=indices.contiguous(), weights=weights.contiguous())


class GCARetrieval(_Retrieval):
    """forward(x [s, b, h], memory) -> Selection(indices/weights [b, C, K] per query chunk, keys/values)."""

    def __init__(self, config, layer_number: int = 1, pg_collection=None, **kwargs):
        super().__init__(config, pg_collection)
        config = self.config
        h = config.hidden_size
        self.head_dim = config.kv_channels
        _, tp_size = _tp_world(pg_collection)
        self.kv_heads_local = config.gca_kv_heads // tp_size
        tp_group = self._grad_tp_group
        self.landmark_query_norm = RMSNorm(config, h, eps=config.layernorm_epsilon)
        linear = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=True, tp_group=tp_group)
        self.key_proj = ColumnParallelLinear(h, config.gca_kv_heads * self.head_dim, **linear)
        self.value_proj = ColumnParallelLinear(h, config.gca_kv_heads * self.head_dim, **linear)

    def forward(self, x: torch.Tensor, memory: ChunkMemory) -> Selection:
        from megatron_ext.kernels.gca import gca_retrieval, selection_for_query_chunks

        s, b, h = x.shape
        S = self.chunk_size
        C = s // S
        landmark_rows = x.reshape(C, S, b, h)[:, -1].transpose(0, 1)  # [b, C, h]: chunk c's landmark token
        query = gather_sequence(self.landmark_query_norm(landmark_rows), dim=1)  # CP: all query chunks ...
        C = query.shape[1]
        landmarks = memory.landmarks.to(query.dtype)
        cu = memory.cu_seqlens
        if cu is not None:  # packed: one flat sequence for the kernels (chunk ids become b*C + c)
            query, landmarks = query.reshape(1, b * C, h), landmarks.reshape(1, b * C, h)
        seed = self._noise_seed(query.device)
        made_by, weights_made_by = gca_retrieval(
            query, landmarks, topk=self.topk, chunk_size=S, gumbel=seed is not None, cu_seqlens=cu,
            generator=None if seed is None else torch.Generator(device=query.device).manual_seed(seed),
            backend=self.backend,
        )
        indices, weights = selection_for_query_chunks(made_by, weights_made_by, chunk_size=S, cu_seqlens=cu)
        indices, weights = local_rows(indices, dim=1), local_rows(weights, dim=1)  # ... this rank's query chunks
        weights = sum_gradient_over_tp(weights, self._grad_tp_group)  # replicated, used by this rank's heads only
        keys, _ = self.key_proj(memory.encoded)
        values, _ = self.value_proj(memory.encoded)
        keys = keys.reshape(b, C * S, self.kv_heads_local, self.head_dim)
        values = values.reshape(b, C * S, self.kv_heads_local, self.head_dim)
        return Selection(indices=indices, weights=weights, keys=keys, values=values)
