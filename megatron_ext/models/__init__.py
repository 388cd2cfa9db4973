"""Models: HSAConfig, the attention-kind registry, layer patterns and the model builder (megatron-core GPTModel)."""

from megatron_ext.models.config import HSAConfig, config_from_yaml
from megatron_ext.models.pattern import LayerPlan, format_layer_pattern, parse_layer_pattern
from megatron_ext.models.registry import ATTENTION_KINDS, AttentionKind, register_attention_kind
from megatron_ext.models.builder import build_layer_specs, build_model, layer_is_moe

__all__ = [
    "HSAConfig",
    "config_from_yaml",
    "LayerPlan",
    "parse_layer_pattern",
    "format_layer_pattern",
    "ATTENTION_KINDS",
    "AttentionKind",
    "register_attention_kind",
    "build_layer_specs",
    "build_model",
    "layer_is_moe",
]
