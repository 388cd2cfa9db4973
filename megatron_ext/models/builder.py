"""Pattern -> megatron-core layer specs -> GPTModel.

``build_layer_specs(config)`` turns ``config.layer_pattern`` into a ``TransformerBlockSubmodules`` (one layer spec per
layer of this pipeline stage, the norm of ``config.normalization`` as the final norm); ``build_model(config,
vocab_size=...)`` passes it to :class:`HSAGPTModel`, megatron-core's ``GPTModel`` with the fused cross entropy of
``megatron_ext.kernels.fused``, and the RoPE options (``rotary_percent``, ``use_rope_scaling``, ...) as
Megatron-LM's ``pretrain_gpt.py`` passes them.
This is the one model provider of ``pretrain_hsa.py``, the tests and ``tools/model_summary.py``.

The MLP slot of each layer is dense or MoE: a ``:moe``/``:dense`` suffix in the pattern decides, otherwise
megatron's ``moe_layer_freq`` (int N: layers 0, N, 2N, ...; list: 1 = MoE) when ``num_moe_experts`` is set.
MoE layers use :func:`megatron_ext.layers.moe_experts.get_moe_spec` (grouped-GEMM experts without TE, TE's with it;
``config.moe_experts_impl`` picks) — the single place to switch the expert implementation.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_ext.models.config import HSAConfig
from megatron_ext.models.pattern import LayerPlan
from megatron_ext.models.registry import ATTENTION_KINDS

__all__ = ["layer_is_moe", "mlp_builder_for_layer", "build_layer_specs", "build_model", "HSAGPTModel"]


class HSAGPTModel(GPTModel):
    """megatron-core's ``GPTModel``; its language-model loss runs ``megatron_ext.kernels.fused.cross_entropy`` (one
    pass over the bf16 logits forward and one backward, instead of megatron's fp32 copies of them) wherever
    ``config.fused_kernel_backend`` resolves to the Triton kernels. Transformer Engine's cross entropy still serves
    when ``cross_entropy_loss_fusion`` with ``cross_entropy_fusion_impl='te'`` asks for it, and megatron's own
    everywhere else (CPU, backend 'reference')."""

    def compute_language_model_loss(self, labels, logits):
        from megatron_ext.kernels.fused import cross_entropy, runs_triton

        config = self.config
        backend = getattr(config, "fused_kernel_backend", "auto")
        te_asked = config.cross_entropy_loss_fusion and config.cross_entropy_fusion_impl == "te"
        if te_asked or not runs_triton(backend, logits):
            return super().compute_language_model_loss(labels, logits)
        # logits [s, b, V_local], labels [b, s] -> loss [b, s], as megatron's
        loss = cross_entropy(logits, labels.transpose(0, 1), tp_group=self.tp_group, backend=backend)
        return loss.transpose(0, 1).contiguous()


def layer_is_moe(config: HSAConfig, plan: LayerPlan) -> bool:
    if plan.mlp is not None:
        return plan.mlp == "moe"
    if not config.num_moe_experts:
        return False
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return plan.index % freq == 0
    if len(freq) != config.num_layers:
        raise ValueError(f"moe_layer_freq has {len(freq)} entries but num_layers={config.num_layers}")
    return bool(freq[plan.index])


def mlp_builder_for_layer(config: HSAConfig, plan: LayerPlan):
    from megatron_ext.layers.specs import dense_mlp_builder

    if layer_is_moe(config, plan):
        from megatron_ext.layers.moe_experts import get_moe_spec

        return get_moe_spec(getattr(config, "moe_experts_impl", "auto"))
    return dense_mlp_builder()


def _stage_slice(config: HSAConfig, vp_stage: Optional[int], pp_rank: Optional[int]) -> slice:
    if config.pipeline_model_parallel_size == 1:
        return slice(0, config.num_layers)
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
    return slice(offset, offset + get_num_layers_to_build(config, vp_stage, pp_rank))


def build_layer_specs(config: HSAConfig, pattern: Optional[str] = None, *, vp_stage: Optional[int] = None,
                      pp_rank: Optional[int] = None) -> TransformerBlockSubmodules:
    """One ``ModuleSpec(TransformerLayer...)`` per layer of this pipeline stage, from the layer pattern."""
    from megatron_ext.layers.norms import norm_builder
    from megatron_ext.models.pattern import parse_layer_pattern

    if pattern is None:
        plans = config.layer_plans
    else:
        plans = parse_layer_pattern(pattern, frozenset(k for k, v in ATTENTION_KINDS.items() if v.retrieval))
        if len(plans) != config.num_layers:
            raise ValueError(f"pattern {pattern!r} has {len(plans)} layers but config.num_layers={config.num_layers}")
    specs = [ATTENTION_KINDS[p.kind].build_spec(config, p, mlp_builder_for_layer(config, p)) for p in plans]
    return TransformerBlockSubmodules(layer_specs=specs[_stage_slice(config, vp_stage, pp_rank)],
                                      layer_norm=norm_builder(config))


def build_model(config: HSAConfig, *, vocab_size: Optional[int] = None, pre_process: bool = True,
                post_process: bool = True, vp_stage: Optional[int] = None, pg_collection=None):
    """:class:`HSAGPTModel` with the layers of ``config.layer_pattern``.

    vocab_size: the (padded) vocabulary; defaults to ``config.vocab_size``.
    """
    vocab = vocab_size if vocab_size is not None else config.vocab_size
    if vocab is None:
        raise ValueError("build_model: give vocab_size= (or set vocab_size in the config / YAML)")
    pp_rank = None
    if config.pipeline_model_parallel_size > 1:
        from megatron.core import parallel_state

        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    spec = build_layer_specs(config, vp_stage=vp_stage, pp_rank=pp_rank)
    model = HSAGPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab,
        max_sequence_length=config.max_position_embeddings or config.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not config.untie_embeddings_and_output_weights,
        position_embedding_type=config.position_embedding_type,
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )
    if config.retrieval_kind is not None:  # PP: the chunk memory travels with the activation between stages
        from megatron_ext.parallel.pipeline import install_chunk_memory_handoff

        install_chunk_memory_handoff(model)
    return model
