"""Tiny model configs shared by the model tests (each builds in well under a second on the CPU)."""

from megatron_ext.models import HSAConfig

VOCAB = 97
SEQ = 64
CHUNK = 8
WINDOW = 6


def tiny_config(pattern: str, **overrides) -> HSAConfig:
    from megatron_ext.models.pattern import parse_layer_pattern

    fields = dict(
        num_layers=len(parse_layer_pattern(pattern)),
        hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        normalization="RMSNorm",
        gated_linear_unit=True,
        add_bias_linear=False,
        qk_layernorm=True,
        layer_pattern=pattern,
        seq_length=SEQ,
        swa_window_size=WINDOW,
        hsa_chunk_size=CHUNK,
        hsa_topk=2,
        hsa_num_kv_heads=1,
        hsa_encoder_layers=1,
        hsa_kernel_backend="reference",
        vocab_size=VOCAB,
    )
    fields.update(overrides)
    return HSAConfig(**fields)


# One tiny config per example model family.
FAMILIES = {
    "gpt_full": dict(pattern="full*3"),
    "gpt_swa": dict(pattern="swa*3"),
    "swa_hsa": dict(pattern="swa*2 [hsa swa] [hsa swa]", hsa_inner_swa=True, hsa_rank_decay=True,
                    hsa_landmark_norm=True, hsa_gumbel_noise=True),
    "swa_hsa_moe": dict(pattern="swa:dense [hsa swa]*2", num_moe_experts=4, moe_router_topk=2,
                        moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32, hsa_inner_swa=True,
                        num_attention_heads=8, num_query_groups=2, hsa_num_kv_heads=2, hsa_retrieval_heads=2,
                        moe_experts_impl="sequential", moe_token_dispatcher_type="allgather"),
    # The other HSA options: stick-breaking weights, off-by-one softmax, no chunk encoder (mean-pool landmarks),
    # plain residual, no QK-norm, one retrieval head shared by 2 KV heads.
    "swa_hsa_options": dict(pattern="swa [hsa] swa [hsa]", hsa_weight_rule="stick_breaking",
                            hsa_softmax_off_by_one=True, hsa_encoder_layers=0, hsa_encoder_cls=False,
                            hsa_bypass_residual=False, hsa_qk_norm=False, hsa_num_kv_heads=2, hsa_retrieval_heads=1,
                            hsa_retrieval_dim=32),
    "drt_gca": dict(pattern="swa*2 [gca*2]", hsa_encoder_layers=2, num_query_groups=4, hsa_gumbel_noise=True,
                    swa_alibi=True, position_embedding_type="none"),
}
