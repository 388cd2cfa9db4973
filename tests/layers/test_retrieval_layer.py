"""The retrieval layer composes its parts as the reference models do (bypass residual, inner SWA first)."""

import pytest
import torch

from megatron_ext.models import build_model
from tests.models.tiny import SEQ, tiny_config


@pytest.mark.parametrize("bypass", [True, False])
@pytest.mark.parametrize("inner_swa", [True, False])
def test_layer_equals_its_parts(megatron_world, bypass, inner_swa):
    model = build_model(tiny_config("[hsa]", hsa_bypass_residual=bypass, hsa_inner_swa=inner_swa))
    layer = model.decoder.layers[0].eval()
    x = torch.randn(SEQ, 2, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, memory = layer(hidden_states=x, attention_mask=None)
        mem = layer.chunk_memory(x)  # memory and retrieval read the layer's input
        mem = mem.with_selection(layer.retrieval(x, mem), group=0)
        h = x
        if inner_swa:
            swa, bias = layer.self_attention(layer.input_layernorm(x), attention_mask=None)
            h = x + swa + (bias if bias is not None else 0)
        a, _ = layer.cross_attention(layer.pre_cross_attn_layernorm(h), mem)
        if bypass:  # out = h + MLP(norm(h + a)): HSA reaches the residual stream only through the MLP
            mlp, _ = layer.mlp(layer.pre_mlp_layernorm(h + a))
            expected = h + mlp
        else:
            mlp, _ = layer.mlp(layer.pre_mlp_layernorm(h + a))
            expected = h + a + mlp
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(memory.keys, mem.keys)
    assert memory.selection is not None and memory.group == 0
