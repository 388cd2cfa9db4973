"""The in-process world-size-1 fixture builds and trains a megatron-core module."""

import torch


def test_world_size_one_gpt_forward_backward(megatron_world):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, use_cpu_initialization=True,
                               hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=64, max_sequence_length=16)
    tokens = torch.randint(0, 64, (2, 16))
    mask = torch.triu(torch.ones(16, 16, dtype=torch.bool), 1)[None, None]
    loss = model(tokens, torch.arange(16).expand(2, 16), mask, labels=tokens).mean()
    loss.backward()
    # An untrained model over 64 tokens starts near the uniform cross-entropy, ln 64.
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.5
    assert all(p.grad is not None for p in model.parameters())
