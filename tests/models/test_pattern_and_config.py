"""Layer patterns parse into the intended layers and groups; invalid configs fail naming the field and a fix."""

import pytest

from megatron_ext.models import format_layer_pattern, parse_layer_pattern
from tests.models.tiny import tiny_config


def test_345m_pattern_two_groups():
    plans = parse_layer_pattern("swa*8 [hsa swa*4]*2")
    assert [p.kind for p in plans] == ["swa"] * 8 + (["hsa"] + ["swa"] * 4) * 2
    assert [p.group for p in plans] == [None] * 8 + [0] * 5 + [1] * 5
    assert [p.index for p in plans if p.group_head] == [8, 13]
    assert [p.index for p in plans if p.memory_builder] == [8]
    assert format_layer_pattern(plans) == "swa*8 [hsa swa*4] [hsa swa*4]"


def test_shared_group_mlp_suffix_and_lone_retrieval_layers():
    plans = parse_layer_pattern("swa:dense, [gca*3], hsa:moe, hsa")
    assert [p.mlp for p in plans] == ["dense", None, None, None, "moe", None]
    assert [p.group for p in plans] == [None, 0, 0, 0, 1, 2]  # a lone retrieval layer is its own group
    assert [p.group_head for p in plans] == [False, True, False, False, True, True]


@pytest.mark.parametrize("bad, needle", [
    ("swa*8 [hsa swa", "without a closing"),
    ("swa] hsa", "without an opening"),
    ("[swa*2]", "no retrieval layer"),
    ("swa*0", ">= 1"),
    ("swa [hsa [swa]]", "nested"),
    ("swa+hsa", "cannot read"),
])
def test_bad_patterns(bad, needle):
    with pytest.raises(ValueError, match=needle):
        parse_layer_pattern(bad)


@pytest.mark.parametrize("overrides, field, fix", [
    (dict(layer_pattern="swa*2 [hsa swa]", num_layers=5), "layer_pattern", "num_layers: 4"),
    (dict(layer_pattern="swa mamba"), "layer_pattern", "register_attention_kind"),
    (dict(layer_pattern="[hsa] [gca]"), "layer_pattern", "one retrieval kind"),
    (dict(hsa_num_kv_heads=3), "hsa_num_kv_heads", "divisor"),
    (dict(hsa_retrieval_heads=2, hsa_num_kv_heads=4), "hsa_retrieval_heads", "1 (shared)"),
    (dict(hsa_retrieval_dim=30, hsa_retrieval_heads=4, hsa_num_kv_heads=4), "hsa_retrieval_dim", "multiple"),
    (dict(hsa_weight_rule="sparsemax"), "hsa_weight_rule", "softmax"),
    (dict(seq_length=60), "seq_length", "seq_length=64"),
    (dict(hsa_encoder_layers=0), "hsa_encoder_cls", "mean-pool"),
    (dict(hsa_kernel_backend="cuda"), "hsa_kernel_backend", "auto"),
    (dict(fused_kernel_backend="te"), "fused_kernel_backend", "auto"),
    (dict(layer_pattern="swa*2", fused_kernel_backend="apex"), "fused_kernel_backend", "auto"),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
     "recompute_num_layers", "--recompute-num-layers 1"),
    (dict(fp32_residual_connection=True), "fp32_residual_connection", "drop --fp32-residual-connection"),
    (dict(layer_pattern="swa [gca]", fp32_residual_connection=True), "fp32_residual_connection", "drop"),
    (dict(swa_window_size=0), "swa_window_size", "512"),
    (dict(swa_alibi=True), "swa_alibi", "position_embedding_type: none"),
    # DRT's ALiBi decoder has no context-parallel attention: the first forward failed, suggesting TE attention,
    # which ALiBi refuses.
    (dict(layer_pattern="swa [gca]", swa_alibi=True, position_embedding_type="none", context_parallel_size=2),
     "swa_alibi", "context_parallel_size: 1"),
    (dict(layer_pattern="swa [hsa:moe swa]"), "layer_pattern", "num_moe_experts"),
    # Encoder shapes that megatron's TP split would reject with a raw error while building the model.
    (dict(tensor_model_parallel_size=2, hidden_size=96, num_attention_heads=6, hsa_encoder_num_query_groups=3),
     "hsa_encoder_num_query_groups", "e.g. 2"),
    (dict(tensor_model_parallel_size=2, hsa_encoder_ffn_hidden_size=97), "hsa_encoder_ffn_hidden_size", "e.g. 98"),
])
def test_invalid_configs_name_the_field_and_a_fix(overrides, field, fix):
    pattern = overrides.pop("layer_pattern", "swa [hsa swa]")
    with pytest.raises(ValueError) as err:
        tiny_config(pattern, **overrides)
    msg = str(err.value)
    assert f"HSAConfig.{field}" in msg and "Fix:" in msg and fix in msg, msg


def test_gca_needs_an_encoder():
    with pytest.raises(ValueError, match="HSAConfig.hsa_encoder_layers"):
        tiny_config("swa [gca]", hsa_encoder_layers=0, hsa_encoder_cls=False)


def test_defaults_are_the_papers():
    config = tiny_config("swa [hsa swa]")
    assert config.hsa_bypass_residual and config.hsa_weight_rule == "softmax" and not config.hsa_softmax_off_by_one
    assert config.hsa_heads == config.hsa_num_kv_heads and config.hsa_retrieval_width == config.hidden_size
    assert config.encoder_ffn_size == 128  # floor(8/3 * 64 / 64) * 64


def test_moe_per_layer_from_pattern_or_moe_layer_freq():
    from megatron_ext.models import layer_is_moe

    moe = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
    every_other = tiny_config("swa*3 [hsa swa]", moe_layer_freq=2, **moe)
    assert [layer_is_moe(every_other, p) for p in every_other.layer_plans] == [True, False, True, False, True]
    listed = tiny_config("swa*3 [hsa swa]", moe_layer_freq=[0, 0, 1, 1, 0], **moe)
    assert [layer_is_moe(listed, p) for p in listed.layer_plans] == [False, False, True, True, False]
    suffix = tiny_config("swa:dense swa*2 [hsa:dense swa]", **moe)  # the suffix wins over moe_layer_freq=1
    assert [layer_is_moe(suffix, p) for p in suffix.layer_plans] == [False, True, True, False, True]
    dense = tiny_config("swa*3 [hsa swa]")
    assert not any(layer_is_moe(dense, p) for p in dense.layer_plans)


_MOE = dict(num_moe_experts=6, moe_router_topk=2, moe_ffn_hidden_size=32)


@pytest.mark.parametrize("overrides, field, fix", [
    # megatron's MoELayer asserts `num_moe_experts % ep_size == 0` (no message) when the model is built.
    (dict(_MOE, expert_model_parallel_size=4), "num_moe_experts", "e.g. 8"),
    # torch.topk fails with 'selected index k out of range' at the first forward.
    (dict(_MOE, moe_router_topk=8), "moe_router_topk", "at most 6"),
    # The experts' fc1/fc2 and the shared expert's linears are split over (expert) TP: megatron's bare divide().
    (dict(_MOE, tensor_model_parallel_size=2, moe_ffn_hidden_size=33), "moe_ffn_hidden_size", "e.g. 34"),
    (dict(_MOE, tensor_model_parallel_size=2, moe_shared_expert_intermediate_size=33),
     "moe_shared_expert_intermediate_size", "e.g. 34"),
])
def test_moe_sizes_that_do_not_divide_name_the_field_and_a_fix(overrides, field, fix):
    with pytest.raises(ValueError) as err:
        tiny_config("swa [hsa swa]", **overrides)
    msg = str(err.value)
    assert f"HSAConfig.{field}" in msg and "Fix:" in msg and fix in msg, msg


def test_moe_sizes_that_divide_are_accepted():
    config = tiny_config("swa [hsa swa]", num_moe_experts=8, moe_router_topk=8, moe_ffn_hidden_size=34,
                         moe_shared_expert_intermediate_size=34, expert_model_parallel_size=4,
                         tensor_model_parallel_size=2)
    assert config.num_moe_experts == 8
