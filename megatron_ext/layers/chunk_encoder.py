"""Chunk encoders: turn the residual stream at the memory layer into the :class:`ChunkMemory`.

Each chunk of S tokens is encoded independently by a small bidirectional transformer (megatron ``TransformerLayer``s
with non-causal attention, QK-RMSNorm, q/k/v bias, a SwiGLU FFN of floor(8/3 h / 64) * 64 and *local* RoPE, positions
0..S within the chunk), followed by a final RMSNorm.

* :class:`HSAChunkMemory` (SWA+HSA / RAMba): a learned CLS vector is appended to every chunk; its encoder output,
  mapped to ``hsa_retrieval_dim`` (R heads), is the chunk's landmark. The chunk tokens' outputs are projected once to
  the memory K/V (Hk heads, per-head RMSNorm on K with ``hsa_qk_norm``) that every HSA layer above shares.
  Without an encoder (``hsa_encoder_layers=0``) or CLS, the landmark is the mean of the chunk's (encoded or
  RMS-normalised) tokens.
* :class:`GCAChunkMemory` (DRT): the input is RMS-normalised first; the last row of every chunk is its landmark
  token and the encoder output there is the landmark key (no projection). Each GCA group projects its own K/V from
  the encoder output (see ``retrieval.GCARetrieval``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import ColumnParallelLinear
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron_ext.layers.chunk_memory import ChunkMemory, merge_chunks, split_chunks, without_sequence_parallel
from megatron_ext.layers.norms import RMSNorm
from megatron_ext.parallel.context import gather_sequence
from megatron_ext.parallel.tensor import ReplicatedLinear, kv_head_partition, sum_gradient_over_tp
from megatron_ext.layers.specs import attention_layer_spec, dense_mlp_builder, self_attention_spec

__all__ = ["ChunkEncoder", "HSAChunkMemory", "GCAChunkMemory", "encoder_config"]


def encoder_config(config):
    """The chunk encoder's layer config: Qwen2-style (q/k/v bias, QK-norm, SwiGLU of the encoder width)."""
    enc = copy.copy(config)
    enc.num_query_groups = config.encoder_query_groups
    enc.ffn_hidden_size = config.encoder_ffn_size
    enc.add_qkv_bias = True
    enc.gated_linear_unit = True
    enc.activation_func = F.silu
    enc.qk_layernorm = bool(getattr(config, "hsa_qk_norm", True))
    enc.num_moe_experts = None
    enc.moe_layer_freq = 1
    enc.recompute_granularity = None
    # Each rank encodes its own whole chunks: attention must stay local. With CP > 1 TE's attention would take the
    # CP group and treat each rank's chunk batch as one piece of a longer sequence (ring attention).
    enc.context_parallel_size = 1
    # megatron's SwiGLU and bias-dropout-add fusions are torch.compile'd functions shared by every layer. Called
    # with the encoder's [S+1, b*C, h] shapes as well as the decoder's, torch.compile recompiles them for dynamic
    # shapes, and every decoder MLP then runs the slower dynamic kernels (H100, SWA+HSA-345M: the SwiGLU backward
    # 0.53 -> 1.5 ms per layer). The encoder runs them eagerly instead (with dropout 0 the add is one kernel).
    enc.bias_activation_fusion = False
    enc.bias_dropout_fusion = False
    return enc


def _tp_world(pg_collection) -> tuple[int, int]:
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        return pg_collection.tp.rank(), pg_collection.tp.size()
    return (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size())


class ChunkEncoder(MegatronModule):
    """Bidirectional per-chunk encoder. forward(chunks [S', b*C, h]) -> [S', b*C, h] (S' = S, or S + 1 with CLS)."""

    def __init__(self, config, num_layers: int, pg_collection=None):
        super().__init__(config=config)
        enc = encoder_config(config)
        spec = attention_layer_spec(enc, self_attention_spec(enc, causal=False), dense_mlp_builder())
        if enc.qk_layernorm and not config.qk_layernorm:
            # finalize_model_grads sums QK-norm grads over TP only when the model itself has QK-norm.
            from megatron_ext.parallel.tensor import TPSummedRMSNorm

            attention = spec.submodules.self_attention.submodules
            attention.q_layernorm = attention.k_layernorm = TPSummedRMSNorm
        self.layers = torch.nn.ModuleList(
            [
                build_module(spec, config=enc, layer_number=i + 1, pg_collection=pg_collection, add_layer_offset=False)
                for i in range(num_layers)
            ]
        )
        self.final_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.rotary = RotaryEmbedding(
            kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=config.rotary_base,
            use_cpu_initialization=True,
        )
        self.rotary.cp_group = None  # positions are local to a chunk: never split them over context parallelism

    def forward(self, chunks: torch.Tensor) -> torch.Tensor:
        rope = self.rotary(chunks.shape[0]).to(chunks.device)  # local positions 0..S'-1
        y = chunks
        for layer in self.layers:
            y, _ = layer(hidden_states=y, attention_mask=None, rotary_pos_emb=rope)
        return self.final_norm(y)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # self.layers is a plain ModuleList: megatron's default would save its TP-sharded linears as replicated.
        from megatron_ext.parallel.checkpoint import sharded_state_dict_through_containers

        return sharded_state_dict_through_containers(self, prefix, sharded_offsets, metadata)


class HSAChunkMemory(MegatronModule):
    """Chunk encoder + landmarks + shared memory K/V for HSA. forward(x [s, b, h]) -> ChunkMemory."""

    def __init__(self, config, layer_number: int = 1, pg_collection=None, **kwargs):
        config = without_sequence_parallel(config)
        super().__init__(config=config)
        h, S = config.hidden_size, config.hsa_chunk_size
        self.chunk_size = S
        self.head_dim = config.kv_channels
        self.retrieval_heads = config.hsa_heads
        self.retrieval_head_dim = config.hsa_retrieval_width // config.hsa_heads
        tp_group = pg_collection.tp if pg_collection is not None else None
        self._grad_tp_group = tp_group
        # This rank's KV heads; with fewer KV heads than TP ranks, each is computed (replicated) on TP/Hk ranks.
        self.kv_head_start, self.kv_heads_local, self.kv_replicated = kv_head_partition(
            config.hsa_num_kv_heads, tp_group
        )
        self.encoder = ChunkEncoder(config, config.hsa_encoder_layers, pg_collection) if config.hsa_encoder_layers else None
        self.input_norm = None if self.encoder is not None else RMSNorm(config, h, eps=config.layernorm_epsilon)
        self.use_cls = bool(config.hsa_encoder_cls and self.encoder is not None)
        if self.use_cls:
            cls = torch.empty(h, dtype=config.params_dtype)
            torch.nn.init.normal_(cls, std=config.init_method_std)
            self.cls_token = torch.nn.Parameter(cls)
        linear = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=True, tp_group=tp_group)
        # Landmarks: every rank needs all R heads (retrieval is replicated), hence gather_output.
        self.landmark_proj = ColumnParallelLinear(h, config.hsa_retrieval_width, gather_output=True, **linear)
        kv_linear = ReplicatedLinear if self.kv_replicated else ColumnParallelLinear
        self.key_proj = kv_linear(h, config.hsa_num_kv_heads * self.head_dim, **linear)
        self.value_proj = kv_linear(h, config.hsa_num_kv_heads * self.head_dim, **linear)
        self.key_norm = RMSNorm(config, self.head_dim, eps=config.layernorm_epsilon) if config.hsa_qk_norm else None

    def forward(self, x: torch.Tensor) -> ChunkMemory:
        s, b, h = x.shape
        S = self.chunk_size
        chunks = split_chunks(x, S)  # [S, b*C, h]
        C = chunks.shape[1] // b
        if self.encoder is not None:
            if self.use_cls:
                cls = self.cls_token.to(chunks.dtype).expand(1, chunks.shape[1], h)
                chunks = torch.cat([chunks, cls], dim=0)  # CLS appended at the end of each chunk
            encoded = self.encoder(chunks)
            if self.use_cls:
                summary, encoded = encoded[-1], encoded[:-1]
            else:
                summary = encoded.mean(dim=0)
        else:
            encoded = self.input_norm(chunks)
            summary = encoded.mean(dim=0)
        landmarks, _ = self.landmark_proj(summary.reshape(b, C, h))
        landmarks = landmarks.reshape(b, C, self.retrieval_heads, self.retrieval_head_dim)
        tokens = merge_chunks(encoded, b)  # [b, C*S, h]
        keys, _ = self.key_proj(tokens)
        values, _ = self.value_proj(tokens)
        keys = keys.reshape(b, C * S, -1, self.head_dim)
        values = values.reshape(b, C * S, -1, self.head_dim)
        if self.kv_replicated:  # every KV head computed here; this rank serves one (its query heads' group)
            heads = slice(self.kv_head_start, self.kv_head_start + self.kv_heads_local)
            keys = sum_gradient_over_tp(keys, self._grad_tp_group)[:, :, heads]
            values = sum_gradient_over_tp(values, self._grad_tp_group)[:, :, heads]
        if self.key_norm is not None:  # one norm weight for all KV heads, this rank's heads only: sum over TP
            keys = self.key_norm.normalize(keys, sum_gradient_over_tp(self.key_norm.weight, self._grad_tp_group))
        # Context parallelism: this rank encoded its own chunks; every rank's queries read all of them.
        landmarks, keys, values = (gather_sequence(t, dim=1) for t in (landmarks, keys, values))
        return ChunkMemory(chunk_size=S, landmarks=landmarks, keys=keys, values=values)


class GCAChunkMemory(MegatronModule):
    """DRT's chunk encoder: forward(x [s, b, h]) -> ChunkMemory(landmarks [b, C, h], encoded [b, C*S, h])."""

    def __init__(self, config, layer_number: int = 1, pg_collection=None, **kwargs):
        config = without_sequence_parallel(config)
        super().__init__(config=config)
        self.chunk_size = config.hsa_chunk_size
        self.input_norm = RMSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.encoder = ChunkEncoder(config, config.hsa_encoder_layers, pg_collection)

    def forward(self, x: torch.Tensor) -> ChunkMemory:
        s, b, h = x.shape
        encoded = self.encoder(split_chunks(self.input_norm(x), self.chunk_size))  # [S, b*C, h]
        C = encoded.shape[1] // b
        landmarks = encoded[-1].reshape(b, C, h)  # the landmark token closes every chunk
        # Context parallelism: this rank encoded its own chunks; every rank's queries read all of them.
        landmarks, encoded = gather_sequence(landmarks, dim=1), gather_sequence(merge_chunks(encoded, b), dim=1)
        return ChunkMemory(chunk_size=self.chunk_size, landmarks=landmarks, encoded=encoded)
