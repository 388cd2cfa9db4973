"""Full recomputation of retrieval models, layer by layer (``--recompute-granularity full``): the same loss and
gradients as without it, every layer run twice in a step, and less saved for the backward."""

import pytest
import torch

from megatron_ext.models import build_model
from tests.models.tiny import FAMILIES, SEQ, VOCAB, tiny_config

RECOMPUTE = {
    None: {},
    "uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "block2": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
}


def _step(family: str, recompute: str):
    """(loss, grads, forward calls of each layer, bytes saved for the backward) of one training step."""
    spec = dict(FAMILIES[family])
    torch.manual_seed(0)
    model = build_model(tiny_config(spec.pop("pattern"), **spec, **RECOMPUTE[recompute])).train()
    calls = [0] * len(model.decoder.layers)
    for i, layer in enumerate(model.decoder.layers):
        layer.mlp.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    torch.manual_seed(3)  # Gumbel noise in the retrieval: the recomputation must draw the same
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, torch.arange(SEQ).expand(2, SEQ), None, labels=tokens.roll(-1, dims=1)).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, calls, saved[0]


@pytest.mark.parametrize("family", ["swa_hsa", "drt_gca", "swa_hsa_moe"])
def test_full_recompute_gives_the_gradients_of_a_plain_step(megatron_world, family):
    """swa_hsa: the memory built in layer 3 reaches layer 5 (two retrieval groups); drt_gca: one group, its
    selection made in layer 3 and read in layer 4; swa_hsa_moe: MoE layers recompute too."""
    loss, grads, calls, saved = _step(family, None)
    n_layers = len(calls)
    assert calls == [1] * n_layers
    for recompute in ("uniform", "block2"):
        loss_r, grads_r, calls_r, saved_r = _step(family, recompute)
        first = n_layers if recompute == "uniform" else 2
        assert calls_r == [2] * first + [1] * (n_layers - first), recompute
        assert saved_r < saved, (recompute, saved_r, saved)
        torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
        for name, grad in grads.items():
            assert grads_r[name].abs().sum() > 0 or grad.abs().sum() == 0, name
            torch.testing.assert_close(grads_r[name], grad, rtol=1e-5, atol=1e-7, msg=f"{recompute}: {name}")


def test_full_recompute_of_a_retrieval_model_moves_to_the_layers():
    config = tiny_config("swa [hsa swa]", **RECOMPUTE["block2"])
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (None,) * 3
    assert (config.layer_recompute_method, config.layer_recompute_num_layers) == ("block", 2)
    plain = tiny_config("swa*2", **RECOMPUTE["uniform"])  # no chunk memory: megatron's block recomputes
    assert plain.recompute_granularity == "full" and plain.layer_recompute_method is None
    with pytest.raises(ValueError, match="recompute_num_layers: .* Fix: use --recompute-num-layers 1"):
        tiny_config("swa [hsa swa]", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2)
