"""Small spec helpers shared by the layer kinds: self-attention, dense MLP and plain transformer-layer specs.

Everything here uses megatron-core's local (non-TE) linear layers, the norm that ``config.normalization`` names (our
:class:`RMSNorm` or :class:`LayerNorm`), megatron's self-attention with our fused rotary embedding, and our core
attention (which picks Transformer Engine when it is importable).
"""

from __future__ import annotations

from typing import Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_ext.layers.core_attention import core_attention_builder
from megatron_ext.layers.layer_recompute import RecomputingTransformerLayer
from megatron_ext.layers.norms import norm_builder
from megatron_ext.layers.self_attention import FusedRotarySelfAttention

__all__ = ["self_attention_spec", "dense_mlp_builder", "attention_layer_spec"]


def self_attention_spec(config, *, causal: bool = True, window_size: Optional[int] = None,
                        qk_norm: Optional[bool] = None) -> ModuleSpec:
    """megatron ``SelfAttention`` (with the fused rotary embedding on GPUs) and our core attention; RoPE comes from the
    ``rotary_pos_emb`` it is given."""
    qk_norm = config.qk_layernorm if qk_norm is None else qk_norm
    norm = norm_builder(config)
    return ModuleSpec(
        module=FusedRotarySelfAttention,
        params={"attn_mask_type": AttnMaskType.causal if causal else AttnMaskType.no_mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention_builder(config, window_size),
            linear_proj=RowParallelLinear,
            q_layernorm=norm if qk_norm else IdentityOp,
            k_layernorm=norm if qk_norm else IdentityOp,
        ),
    )


def dense_mlp_builder():
    """megatron's dense MLP (SwiGLU when ``config.gated_linear_unit``) on local linear layers."""
    return get_mlp_module_spec_for_backend(LocalSpecProvider(), num_experts=None)


def attention_layer_spec(config, attention: ModuleSpec, mlp) -> ModuleSpec:
    """A pre-norm ``TransformerLayer``: x + attn(norm x), then + mlp(norm x) (one that can recompute itself, see
    ``layers/layer_recompute.py``)."""
    norm = norm_builder(config)
    return ModuleSpec(
        module=RecomputingTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=attention,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )
