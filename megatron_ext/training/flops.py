"""Training FLOPs of a model with full, sliding-window, HSA and GCA layers and MoE MLPs (MFU, TFLOP/s per GPU).

Matmul FLOPs only (2 per multiply-add); a training step costs 3x the forward (backward = 2x forward; activation
recomputation is not counted, as in the usual MFU definition). Two parts:

* **linear layers**, counted from the model's own parameters (so every projection of every layer kind is counted
  as built): each matrix parameter costs 2 FLOPs per token per element; routed-expert matrices are scaled by
  top-k / number of experts (only the experts a token is routed to run); embeddings cost nothing, and a tied output
  layer adds 2·h·V per token. Parameters are counted once over the whole parallel world (tensor, pipeline, expert
  and data parallel shards and replicas are accounted for).
* **attention cores**, from the layer pattern, per sequence of L tokens (Hq query heads, head dim d):
  full causal 2·L²·Hq·d; sliding window W (token t sees min(t+1, W+1) keys) 4·Hq·d·Σ_t min(t+1, W+1);
  HSA / GCA chunk attention 4·L·Hq·K·S·d (K chunks of S tokens, all in the past: no causal halving), plus the
  retrieval scores of each group's head layer d_r·L²/S (tokens against past landmarks), plus the chunk encoder's
  bidirectional attention over each chunk (once, at the layer that builds the chunk memory), plus an inner
  sliding window when ``hsa_inner_swa``.

``docs``: ../shared/docs/performance.md §2 (the per-kernel counts used here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# NVIDIA's published dense (not 2:4-sparse) bf16 tensor-core peaks, TFLOP/s, keyed by what
# ``torch.cuda.get_device_name()`` reports; first match wins. The H100 SXM reports "H100 80GB HBM3" (or "SXM"); the
# PCIe and NVL H100s run at lower clocks. Any other device needs --peak-tflops for MFU.
DENSE_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100 SXM", 989.4),
    ("H100 80GB HBM3", 989.4),
    ("H200", 989.4),  # same compute as the H100 SXM
)
H200_NVL = "H200 NVL"  # a lower-power part whose peak we do not list: --peak-tflops


def device_peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the device named ``device_name`` (``torch.cuda.get_device_name()``), None if not listed."""
    if H200_NVL in device_name:
        return None
    for needle, peak in DENSE_BF16_PEAK_TFLOPS:
        if needle in device_name:
            return peak
    return None


def window_attention_flops(seq_len: int, window: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal sliding-window attention where token t sees keys t-W..t (W+1 keys at most)."""
    L, W = seq_len, window
    if W + 1 >= L:
        keys = L * (L + 1) / 2
    else:
        keys = (W + 1) * (W + 2) / 2 + (L - W - 1) * (W + 1)
    return 4.0 * heads * head_dim * keys


def causal_attention_flops(seq_len: int, heads: int, head_dim: int) -> float:
    """Forward FLOPs of full causal attention, counting the causal half only (2·L²·Hq·d)."""
    return 2.0 * seq_len * seq_len * heads * head_dim


def chunk_attention_flops(seq_len: int, heads: int, head_dim: int, topk: int, chunk_size: int) -> float:
    """Forward FLOPs of HSA/GCA attention: every token attends to topk whole chunks of chunk_size tokens."""
    return 4.0 * seq_len * heads * topk * chunk_size * head_dim


def attention_core_flops_per_sequence(config, seq_len: int) -> float:
    """Forward FLOPs of all attention cores (no projections) for one sequence of ``seq_len`` tokens."""
    heads = config.num_attention_heads
    head_dim = config.kv_channels or config.hidden_size // heads
    plans = _layer_plans(config)
    total = 0.0
    S = getattr(config, "hsa_chunk_size", 64)
    K = getattr(config, "hsa_topk", 8)
    window = getattr(config, "swa_window_size", None)
    if window is None and getattr(config, "window_size", None) is not None:
        window = config.window_size[0]
    for plan in plans:
        kind = plan.kind
        if kind == "full":
            total += causal_attention_flops(seq_len, heads, head_dim)
        elif kind == "swa":
            total += window_attention_flops(seq_len, window, heads, head_dim)
        elif kind in ("hsa", "gca"):
            total += chunk_attention_flops(seq_len, heads, head_dim, K, S)
            if plan.group_head or plan.group is None:
                width = getattr(config, "hsa_retrieval_width", config.hidden_size)
                if kind == "gca":  # one retrieval per query chunk against earlier chunks
                    chunks = seq_len / S
                    total += width * chunks * chunks
                else:
                    total += width * seq_len * seq_len / S
            if plan.memory_builder:
                enc_layers = getattr(config, "hsa_encoder_layers", 0)
                tokens_per_chunk = S + (1 if getattr(config, "hsa_encoder_cls", False) else 0)
                total += enc_layers * (seq_len / S) * 4.0 * heads * head_dim * tokens_per_chunk ** 2
            if kind == "hsa" and getattr(config, "hsa_inner_swa", False):
                inner = getattr(config, "hsa_inner_window_size", None) or window
                total += window_attention_flops(seq_len, inner, heads, head_dim)
        else:
            raise ValueError(f"FLOP model: unknown attention kind {kind!r}; add it to megatron_ext.training.flops")
    return total


def _layer_plans(config):
    plans = getattr(config, "layer_plans", None)
    if plans is not None:
        return plans
    from megatron_ext.models.pattern import LayerPlan

    windowed = getattr(config, "window_size", None) is not None
    return [LayerPlan(index=i, kind="swa" if windowed else "full") for i in range(config.num_layers)]


def _is_expert_param(name: str) -> bool:
    """Routed-expert weights live under ``mlp.experts.`` (shared experts under ``mlp.shared_experts.``)."""
    return ".experts." in name


def _replicas(param: torch.nn.Parameter, expert: bool) -> int:
    """How many ranks hold an identical copy of this (shard of a) parameter."""
    from megatron.core import parallel_state as ps

    if not torch.distributed.is_initialized() or not ps.model_parallel_is_initialized():
        return 1
    tp_split = bool(getattr(param, "tensor_model_parallel", False))
    if expert:
        etp = ps.get_expert_tensor_parallel_world_size()
        return ps.get_expert_data_parallel_world_size() * (1 if tp_split else etp)
    tp = ps.get_tensor_model_parallel_world_size()
    return ps.get_data_parallel_world_size(with_context_parallel=True) * (1 if tp_split else tp)


@dataclass
class FlopModel:
    """Per-token linear FLOPs and per-sequence attention FLOPs of one model (forward)."""

    linear_flops_per_token: float
    attention_flops_per_sequence: float
    seq_length: int

    def training_flops(self, num_sequences: int) -> float:
        """FLOPs of one training step over ``num_sequences`` sequences of ``seq_length`` tokens (fwd + bwd)."""
        forward = num_sequences * (self.seq_length * self.linear_flops_per_token + self.attention_flops_per_sequence)
        return 3.0 * forward

    @classmethod
    def from_model(cls, model_chunks, config, *, seq_length: int, vocab_size: int,
                   tied_output_layer: bool) -> "FlopModel":
        """Count from this rank's model chunks; collective over the world when torch.distributed is up."""
        dense, expert = 0.0, 0.0
        seen = set()
        for chunk in model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]:
            for name, param in chunk.named_parameters():
                if id(param) in seen or param.dim() < 2 or "embedding" in name:
                    continue
                seen.add(id(param))
                is_expert = _is_expert_param(name)
                share = param.numel() / _replicas(param, is_expert)
                if is_expert:
                    expert += share
                else:
                    dense += share
        # On the collective's device (NCCL reduces CUDA tensors only).
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        counts = torch.tensor([dense, expert], dtype=torch.float64, device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        dense, expert = counts.tolist()
        if expert:
            expert *= config.moe_router_topk / config.num_moe_experts
        linear = 2.0 * (dense + expert)
        if tied_output_layer:  # the output layer reuses the embedding matrix, which was skipped above
            linear += 2.0 * config.hidden_size * vocab_size
        return cls(linear, attention_core_flops_per_sequence(config, seq_length), seq_length)


def peak_tflops(override: float | None = None) -> float | None:
    """Peak dense TFLOP/s per device for MFU: the override, the listed bf16 peak of this GPU, else None (unknown)."""
    if override:
        return float(override)
    if torch.cuda.is_available():
        return device_peak_tflops(torch.cuda.get_device_name())
    return None
