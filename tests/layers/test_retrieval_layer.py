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



def _loss_and_grads(model, tokens):
    loss = model(tokens, torch.arange(SEQ).expand(2, SEQ), None, labels=tokens.roll(-1, dims=1)).float().mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _with_transformer_engine_checkpoint(monkeypatch):
    """What TE provides for 'layernorm' recomputation: megatron-core 0.19.2's ``CheckpointWithoutOutput()`` takes
    itself for an FP8 one and reads TE's FP8 state, which only exists with TE installed."""
    from megatron.core.tensor_parallel import random as megatron_random

    from megatron_ext.models import config as config_module

    init = megatron_random.CheckpointWithoutOutput.__init__

    def without_fp8(self, fp8=False):
        init(self, fp8)
        self.fp8 = False

    monkeypatch.setattr(megatron_random.CheckpointWithoutOutput, "__init__", without_fp8)
    monkeypatch.setattr(config_module, "te_available", lambda: True)


def test_selective_recompute_reaches_the_retrieval_layers(megatron_world, monkeypatch):
    """``--recompute-granularity selective --recompute-modules mlp layernorm`` recomputes the retrieval layers' MLP
    and norms in the backward (each runs twice per step, as in megatron's own layers) and changes no number."""
    _with_transformer_engine_checkpoint(monkeypatch)
    tokens = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(1))
    results, calls = [], []
    for recompute in (None, "selective"):
        torch.manual_seed(0)
        model = build_model(tiny_config("swa [hsa swa]", hsa_inner_swa=True, recompute_granularity=recompute,
                                        recompute_modules=["mlp", "layernorm"]))
        layer = model.decoder.layers[1]
        counts = {"mlp": 0, "input_layernorm": 0, "pre_mlp_layernorm": 0}
        for name in counts:
            getattr(layer, name).register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
        results.append(_loss_and_grads(model, tokens))
        calls.append(counts)
    assert calls[0] == {"mlp": 1, "input_layernorm": 1, "pre_mlp_layernorm": 1}
    assert calls[1] == {"mlp": 2, "input_layernorm": 2, "pre_mlp_layernorm": 2}
    (loss, grads), (loss_r, grads_r) = results
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_layernorm_recompute_without_transformer_engine_is_a_config_error(monkeypatch):
    from megatron_ext.models import config as config_module

    monkeypatch.setattr(config_module, "te_available", lambda: False)
    with pytest.raises(ValueError, match="recompute_modules: 'layernorm' recomputation needs Transformer Engine"):
        tiny_config("swa [hsa swa]", recompute_granularity="selective", recompute_modules=["core_attn", "layernorm"])
    tiny_config("swa [hsa swa]", recompute_granularity="selective", recompute_modules=["core_attn", "mlp"])
