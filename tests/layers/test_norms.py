"""RMSNorm and LayerNorm: the formula, dtype handling and the sequence-parallel tag megatron's grad reduction reads."""

import pytest
import torch

from megatron_ext.layers.norms import RMSNorm
from tests.models.tiny import tiny_config


def test_rmsnorm_formula_and_dtype(megatron_world):
    config = tiny_config("full")
    norm = RMSNorm(config, 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 64))
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-5, atol=1e-5)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_rmsnorm_tags_sequence_parallel_weights(megatron_world):
    plain = RMSNorm(tiny_config("full"), 64)
    assert plain.weight.sequence_parallel is False
    sp_config = tiny_config("full", tensor_model_parallel_size=2, sequence_parallel=True)
    assert RMSNorm(sp_config, 64).weight.sequence_parallel is True


def test_norm_builder_follows_normalization_and_refuses_what_it_lacks(megatron_world):
    from megatron_ext.layers.norms import LayerNorm, norm_builder

    assert norm_builder(tiny_config("full")) is RMSNorm
    assert norm_builder(tiny_config("full", normalization="LayerNorm")) is LayerNorm
    sp_config = tiny_config("full", normalization="LayerNorm", tensor_model_parallel_size=2, sequence_parallel=True)
    norm = LayerNorm(sp_config, 64)
    assert norm.weight.sequence_parallel is True and norm.bias.sequence_parallel is True
    with pytest.raises(ValueError, match="layernorm_zero_centered_gamma"):
        norm_builder(tiny_config("full", layernorm_zero_centered_gamma=True))
