"""On a GPU: megatron-core with this project's stack runs a bf16 GPT step that agrees with fp32."""

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_bf16_gpt_forward_matches_fp32_on_gpu(megatron_world):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, hidden_dropout=0.0,
                               attention_dropout=0.0)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=256, max_sequence_length=128).cuda()
    tokens = torch.randint(0, 256, (2, 128), device="cuda")
    mask = torch.triu(torch.ones(128, 128, dtype=torch.bool, device="cuda"), 1)[None, None]
    pos = torch.arange(128, device="cuda").expand(2, 128)
    ref = model(tokens, pos, mask, labels=tokens).float().mean()
    bf16_config = TransformerConfig(num_layers=2, hidden_size=128, num_attention_heads=4, hidden_dropout=0.0,
                                    attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16)
    half = Float16Module(bf16_config, model)
    out = half(tokens, pos, mask, labels=tokens).float().mean()
    out.backward()
    assert torch.isfinite(out)
    assert abs(out.item() - ref.item()) < 2e-2 * abs(ref.item())
