"""The FLOP model against independent counts: torch's FlopCounterMode on real forwards, and masks counted by hand."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_ext.training.flops import (
    FlopModel,
    causal_attention_flops,
    chunk_attention_flops,
    window_attention_flops,
)
from tests.models.tiny import SEQ, VOCAB, tiny_config

HEADS, HEAD_DIM = 4, 16


@pytest.mark.parametrize("seq_len, window", [(64, 6), (64, 63), (64, 200), (100, 1)])
def test_window_flops_count_every_visible_key(seq_len, window):
    t = torch.arange(seq_len)
    visible = ((t[:, None] - t[None, :]) >= 0) & ((t[:, None] - t[None, :]) <= window)
    expected = 4 * HEADS * HEAD_DIM * visible.sum().item()  # QK^T and PV: 2 FLOPs x 2 matmuls per (query, key)
    assert window_attention_flops(seq_len, window, HEADS, HEAD_DIM) == expected


def test_causal_flops_are_the_causal_half():
    seq_len = 512
    pairs = seq_len * (seq_len + 1) // 2
    exact = 4 * HEADS * HEAD_DIM * pairs
    assert causal_attention_flops(seq_len, HEADS, HEAD_DIM) == pytest.approx(exact, rel=2 / seq_len)


def test_chunk_attention_flops_match_the_reference_kernel():
    from megatron_ext.kernels.hsa import hsa_attention

    B, L, Hq, Hk, D, S, K = 1, 128, 4, 1, 16, 16, 4
    q, k, v = torch.randn(B, L, Hq, D), torch.randn(B, L, Hk, D), torch.randn(B, L, Hk, D)
    indices = torch.zeros(B, L, Hk, K, dtype=torch.int32)
    weights = torch.full((B, L, Hk, K), 1.0 / K)
    with FlopCounterMode(display=False) as counter:
        hsa_attention(q, k, v, weights, indices, chunk_size=S, backend="reference")
    assert chunk_attention_flops(L, Hq, D, K, S) == counter.get_total_flops()


def _linear_forward_flops(model, tokens):
    """FLOPs of one forward counted by torch, minus the attention kernels (matmuls of the projections and MLPs)."""
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with FlopCounterMode(display=False) as counter:
        model(tokens, position_ids, None)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "scaled_dot_product" not in str(op))


@pytest.mark.parametrize("pattern, overrides", [
    ("full*2", {}),
    ("full*2", dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_experts_impl="sequential",
                    moe_token_dispatcher_type="allgather", moe_shared_expert_intermediate_size=32)),
])
def test_linear_flops_match_a_counted_forward(megatron_world, pattern, overrides):
    from megatron_ext.models import build_model

    config = tiny_config(pattern, attention_impl="sdpa", **overrides)
    model = build_model(config, vocab_size=VOCAB).eval()
    flop_model = FlopModel.from_model([model], config, seq_length=SEQ, vocab_size=VOCAB,
                                      tied_output_layer=not config.untie_embeddings_and_output_weights)
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        counted = _linear_forward_flops(model, tokens)
    assert flop_model.linear_flops_per_token * tokens.numel() == pytest.approx(counted, rel=1e-9)
    per_sequence = flop_model.attention_flops_per_sequence
    assert per_sequence == pytest.approx(config.num_layers * causal_attention_flops(SEQ, 4, 16))
    assert flop_model.training_flops(2) == pytest.approx(3 * (counted + 2 * per_sequence))


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4),  # the SXM part's reported name
    ("NVIDIA H100 SXM5 80GB", 989.4),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4),
    ("NVIDIA H200 NVL", None),  # not listed: --peak-tflops
    ("NVIDIA H100", None),  # which H100 is unknown: no guess
    ("NVIDIA A100-SXM4-80GB", None),
])
def test_device_peak_matches_the_exact_part(name, peak):
    from megatron_ext.training.flops import device_peak_tflops

    assert device_peak_tflops(name) == peak


def test_peak_tflops_override_wins_and_reads_the_device(monkeypatch):
    from megatron_ext.training.flops import peak_tflops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert peak_tflops() == 756.0
    assert peak_tflops(500.0) == 500.0
