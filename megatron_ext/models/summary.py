"""Parameter counts of a built model: total, and active per token (MoE routed experts counted by top-k / E).

Used by ``tools/model_summary.py`` and the tests. The model is built on the ``meta`` device (no memory) with
megatron's SequentialMLP experts, whose parameters are exactly those of every other expert implementation.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_ext.models.builder import build_model, layer_is_moe
from megatron_ext.models.config import HSAConfig
from megatron_ext.models.pattern import format_layer_pattern

__all__ = ["count_parameters", "build_meta_model", "summarize"]


def build_meta_model(config: HSAConfig, vocab_size: int | None = None):
    """The model with every parameter on the meta device (counts and shapes only)."""
    meta_config = dataclasses.replace(
        config, use_cpu_initialization=True, perform_initialization=False, moe_experts_impl="sequential",
    )
    with torch.device("meta"):
        return build_model(meta_config, vocab_size=vocab_size)


def count_parameters(model, config: HSAConfig) -> tuple[int, int]:
    """(total, active): every parameter once; routed-expert parameters scaled by moe_router_topk / num_experts."""
    total = active = 0
    fraction = config.moe_router_topk / config.num_moe_experts if config.num_moe_experts else 1.0
    for name, param in model.named_parameters():
        n = param.numel()
        total += n
        routed = ".mlp.experts." in name  # routed experts; the shared expert lives in .mlp.shared_experts.
        active += n * fraction if routed else n
    return total, int(round(active))


def summarize(config: HSAConfig, vocab_size: int | None = None) -> str:
    model = build_meta_model(config, vocab_size)
    total, active = count_parameters(model, config)
    plans = config.layer_plans
    lines = [f"layer pattern: {format_layer_pattern(plans)}", "layers:"]
    for plan, layer in zip(plans, model.decoder.layers):
        n = sum(p.numel() for p in layer.parameters())
        roles = [r for r, on in (("chunk memory", plan.memory_builder), ("retrieval", plan.group_head)) if on]
        group = f" group {plan.group}" if plan.group is not None else ""
        mlp = "moe" if layer_is_moe(config, plan) else "dense"
        extra = f" [{', '.join(roles)}]" if roles else ""
        lines.append(f"  {plan.index:3d} {plan.kind:<5} {mlp:<5}{group}{extra}  params {n:,}")
    lines.append(f"total parameters: {total}")
    lines.append(f"active parameters: {active}")
    return "\n".join(lines)
