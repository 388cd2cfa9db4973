"""The chunk encoder under context parallelism: each rank encodes whole chunks of its own, so its attention is local."""

import sys
import types

import torch

from megatron_ext.layers import core_attention
from megatron_ext.layers.chunk_encoder import ChunkEncoder, encoder_config
from tests.models.tiny import tiny_config


def test_encoder_attention_is_built_without_context_parallelism(megatron_world, monkeypatch):
    config = tiny_config("swa*2 [hsa swa]", context_parallel_size=2)
    assert config.context_parallel_size == 2
    assert encoder_config(config).context_parallel_size == 1
    # With Transformer Engine installed the encoder gets megatron's TEDotProductAttention, which takes the CP group
    # (ring attention) whenever its config has context_parallel_size > 1. A stand-in records what it is given.
    seen = []

    class RecordingTEAttention(torch.nn.Module):
        def __init__(self, config, **kwargs):
            super().__init__()
            seen.append(config.context_parallel_size)

    fake = types.ModuleType("megatron.core.extensions.transformer_engine")
    fake.TEDotProductAttention = RecordingTEAttention
    fake.TEFusedMLP = type("TEFusedMLP", (), {})  # TransformerLayer imports it for an isinstance check
    monkeypatch.setitem(sys.modules, "megatron.core.extensions.transformer_engine", fake)
    monkeypatch.setattr(core_attention, "te_available", lambda: True)
    ChunkEncoder(config, num_layers=2)
    assert seen == [1, 1]
