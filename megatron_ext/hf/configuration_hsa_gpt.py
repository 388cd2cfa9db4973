"""Hugging Face configuration of the project's decoder models (``model_type`` "megatron_hsa_gpt").

The fields are the ``HSAConfig`` fields that decide the forward pass, under their megatron names, so a converted
checkpoint's ``config.json`` reads like the YAML it was trained from. ``tools/convert_checkpoint_to_hf.py`` writes it
(``megatron_ext.hf.convert.hf_config_fields``); :mod:`modeling_hsa_gpt` reads it.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class HSAGPTConfig(PretrainedConfig):
    model_type = "megatron_hsa_gpt"

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 1024,
        ffn_hidden_size: int = 4096,
        num_layers: int = 16,
        layer_pattern: str | None = None,
        num_attention_heads: int = 16,
        num_query_groups: int | None = None,
        kv_channels: int | None = None,
        softmax_scale: float | None = None,
        normalization: str = "RMSNorm",
        layernorm_epsilon: float = 1e-5,
        qk_layernorm: bool = False,
        gated_linear_unit: bool = True,
        activation: str = "silu",
        add_bias_linear: bool = False,
        add_qkv_bias: bool = False,
        position_embedding_type: str = "rope",
        rotary_base: float = 10000.0,
        rotary_percent: float = 1.0,
        swa_window_size: int = 512,
        swa_alibi: bool = False,
        hsa_chunk_size: int = 64,
        hsa_topk: int = 8,
        hsa_num_kv_heads: int = 1,
        hsa_retrieval_heads: int = 1,
        hsa_retrieval_dim: int | None = None,
        hsa_weight_rule: str = "softmax",
        hsa_softmax_off_by_one: bool = False,
        hsa_rank_decay: bool = False,
        hsa_landmark_norm: bool = False,
        hsa_qk_norm: bool = True,
        hsa_inner_swa: bool = False,
        hsa_inner_window_size: int | None = None,
        hsa_bypass_residual: bool = True,
        hsa_encoder_layers: int = 1,
        hsa_encoder_cls: bool = True,
        hsa_encoder_num_query_groups: int | None = None,
        hsa_encoder_ffn_hidden_size: int | None = None,
        hsa_kernel_backend: str = "auto",
        gca_kv_heads: int | None = None,
        gca_softmax_off_by_one: bool = False,
        gca_landmark_null_slot: bool = True,
        landmark_token_id: int | None = None,
        num_moe_experts: int | None = None,
        moe_ffn_hidden_size: int | None = None,
        moe_router_topk: int = 2,
        moe_router_score_function: str = "softmax",
        moe_router_pre_softmax: bool = False,
        moe_router_topk_scaling_factor: float | None = None,
        moe_router_expert_bias: bool = False,
        moe_router_dtype: str | None = None,
        moe_shared_expert_intermediate_size: int | None = None,
        moe_layers: list[int] | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_layers = num_layers
        self.layer_pattern = layer_pattern or f"full*{num_layers}"
        self.num_attention_heads = num_attention_heads
        self.num_query_groups = num_query_groups or num_attention_heads
        self.kv_channels = kv_channels or hidden_size // num_attention_heads
        # of full/swa and chunk-encoder attention (None: 1/sqrt(kv_channels)); HSA attention always uses the latter
        self.softmax_scale = softmax_scale
        self.normalization = normalization
        self.layernorm_epsilon = layernorm_epsilon
        self.qk_layernorm = qk_layernorm
        self.gated_linear_unit = gated_linear_unit
        self.activation = activation
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.position_embedding_type = position_embedding_type
        self.rotary_base = rotary_base
        self.rotary_percent = rotary_percent
        self.swa_window_size = swa_window_size
        # ALiBi biases in the causal attention (DRT's lower layers) instead of RoPE; the chunk encoder keeps RoPE
        self.swa_alibi = swa_alibi
        self.hsa_chunk_size = hsa_chunk_size
        self.hsa_topk = hsa_topk
        self.hsa_num_kv_heads = hsa_num_kv_heads
        self.hsa_retrieval_heads = hsa_retrieval_heads
        self.hsa_retrieval_dim = hsa_retrieval_dim or hidden_size
        self.hsa_weight_rule = hsa_weight_rule
        self.hsa_softmax_off_by_one = hsa_softmax_off_by_one
        self.hsa_rank_decay = hsa_rank_decay
        self.hsa_landmark_norm = hsa_landmark_norm
        self.hsa_qk_norm = hsa_qk_norm
        self.hsa_inner_swa = hsa_inner_swa
        self.hsa_inner_window_size = hsa_inner_window_size
        self.hsa_bypass_residual = hsa_bypass_residual
        self.hsa_encoder_layers = hsa_encoder_layers
        self.hsa_encoder_cls = hsa_encoder_cls
        self.hsa_encoder_num_query_groups = hsa_encoder_num_query_groups or self.num_query_groups
        self.hsa_encoder_ffn_hidden_size = hsa_encoder_ffn_hidden_size
        # "auto": the Triton kernels on CUDA tensors, the PyTorch reference elsewhere
        self.hsa_kernel_backend = hsa_kernel_backend
        # GCA (DRT) layers: each group projects its own chunk K/V (gca_kv_heads heads of kv_channels)
        self.gca_kv_heads = gca_kv_heads or num_attention_heads
        self.gca_softmax_off_by_one = gca_softmax_off_by_one
        self.gca_landmark_null_slot = gca_landmark_null_slot
        # the id of the landmark token that closes every chunk of hsa_chunk_size in the training data (GCA, after
        # every hsa_chunk_size - 1 text tokens); the model inserts it itself: inputs and logits are text only
        self.landmark_token_id = landmark_token_id
        # MoE: which layers (0-based indices) have an MoELayer in place of the dense MLP, and its router and experts
        self.num_moe_experts = num_moe_experts
        self.moe_ffn_hidden_size = moe_ffn_hidden_size or ffn_hidden_size
        self.moe_router_topk = moe_router_topk
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.moe_router_expert_bias = moe_router_expert_bias
        self.moe_router_dtype = moe_router_dtype
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.moe_layers = list(moe_layers or [])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
