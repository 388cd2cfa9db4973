"""The attention-kind registry: each kind turns a :class:`LayerPlan` into a megatron-core layer spec.

Built-in kinds:

* ``full``: causal self-attention (RoPE, optional QK-norm) + MLP, megatron's ``TransformerLayer``;
* ``swa``: the same with a sliding window of ``swa_window_size``;
* ``hsa``: :class:`RetrievalTransformerLayer` with HSA over the shared chunk memory (NoPE), the optional inner SWA
  (``hsa_inner_swa``) and the bypass residual; the model's first ``hsa`` layer also owns the chunk encoder, and the
  first ``hsa`` layer of each group owns the group's retrieval;
* ``gca``: :class:`RetrievalTransformerLayer` with SWA, then GCA over the group's chunk K/V (DRT).

New kinds: ``register_attention_kind("name", build_spec, retrieval=False)`` where
``build_spec(config, plan, mlp) -> ModuleSpec`` (``mlp`` is the MLP/MoE builder chosen for that layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

__all__ = ["AttentionKind", "ATTENTION_KINDS", "register_attention_kind"]


@dataclass(frozen=True)
class AttentionKind:
    name: str
    build_spec: Callable  # (config, plan, mlp) -> ModuleSpec of a transformer layer
    retrieval: bool = False  # needs the chunk memory / belongs to retrieval groups


ATTENTION_KINDS: dict[str, AttentionKind] = {}


def register_attention_kind(name: str, build_spec: Callable, *, retrieval: bool = False) -> AttentionKind:
    """Register (or replace) an attention kind usable in ``layer_pattern``."""
    if not name.isidentifier():
        raise ValueError(f"attention kind names must be identifiers (they appear in layer patterns), got {name!r}")
    kind = AttentionKind(name, build_spec, retrieval)
    ATTENTION_KINDS[name] = kind
    return kind


# ----------------------------------------------------------------------------------------------------------------
# Built-in kinds. Layer imports are deferred so that importing the registry stays cheap.
# ----------------------------------------------------------------------------------------------------------------
def _full_spec(config, plan, mlp) -> ModuleSpec:
    from megatron_ext.layers.specs import attention_layer_spec, self_attention_spec

    return attention_layer_spec(config, self_attention_spec(config, causal=True), mlp)


def _swa_spec(config, plan, mlp) -> ModuleSpec:
    from megatron_ext.layers.specs import attention_layer_spec, self_attention_spec

    return attention_layer_spec(
        config, self_attention_spec(config, causal=True, window_size=config.swa_window_size), mlp
    )


def _retrieval_layer_spec(config, plan, mlp, *, inner_window, cross_attention, chunk_memory, retrieval):
    from megatron_ext.layers.norms import norm_builder
    from megatron_ext.layers.retrieval_layer import RetrievalLayerSubmodules, RetrievalTransformerLayer
    from megatron_ext.layers.specs import self_attention_spec

    inner = inner_window is not None
    norm = norm_builder(config)
    return ModuleSpec(
        module=RetrievalTransformerLayer,
        params={"group": plan.group},
        submodules=RetrievalLayerSubmodules(
            input_layernorm=norm if inner else IdentityOp,
            self_attention=self_attention_spec(config, causal=True, window_size=inner_window) if inner else IdentityOp,
            self_attn_bda=get_bias_dropout_add,
            pre_cross_attn_layernorm=norm,
            cross_attention=cross_attention,
            pre_mlp_layernorm=norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
            chunk_memory=chunk_memory if plan.memory_builder else None,
            retrieval=retrieval if plan.group_head else None,
        ),
    )


def _hsa_spec(config, plan, mlp) -> ModuleSpec:
    from megatron_ext.layers.chunk_encoder import HSAChunkMemory
    from megatron_ext.layers.retrieval import HSARetrieval
    from megatron_ext.layers.sparse_attention import HSAAttention

    window = None
    if config.hsa_inner_swa:
        window = config.hsa_inner_window_size or config.swa_window_size
    return _retrieval_layer_spec(
        config, plan, mlp, inner_window=window, cross_attention=HSAAttention, chunk_memory=HSAChunkMemory,
        retrieval=HSARetrieval,
    )


def _gca_spec(config, plan, mlp) -> ModuleSpec:
    from megatron_ext.layers.chunk_encoder import GCAChunkMemory
    from megatron_ext.layers.retrieval import GCARetrieval
    from megatron_ext.layers.sparse_attention import GCAAttention

    return _retrieval_layer_spec(
        config, plan, mlp, inner_window=config.swa_window_size, cross_attention=GCAAttention,
        chunk_memory=GCAChunkMemory, retrieval=GCARetrieval,
    )


register_attention_kind("full", _full_spec)
register_attention_kind("swa", _swa_spec)
register_attention_kind("hsa", _hsa_spec, retrieval=True)
register_attention_kind("gca", _gca_spec, retrieval=True)
