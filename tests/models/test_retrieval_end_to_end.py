"""Retrieval works end to end: with constructed weights, a query that matches a far chunk's landmark selects it,
and the HSA output carries that chunk's values (the chunk lies far outside any window: this model has none)."""

import pytest
import torch

from megatron_ext.models import build_model
from tests.models.tiny import tiny_config

HIDDEN, S, SEQ = 32, 8, 64
NEEDLE_CHUNK = 1  # tokens 8..15; the query is the last token, 48 tokens later


def _needle_model(backend: str):
    config = tiny_config(
        "[hsa]", hidden_size=HIDDEN, num_attention_heads=2, num_query_groups=2, ffn_hidden_size=32, seq_length=SEQ,
        hsa_chunk_size=S, hsa_topk=2, hsa_num_kv_heads=1, hsa_retrieval_heads=1, hsa_retrieval_dim=HIDDEN,
        hsa_encoder_layers=0, hsa_encoder_cls=False, hsa_qk_norm=False, hsa_kernel_backend=backend,
    )
    model = build_model(config)
    layer = model.decoder.layers[0]
    eye = torch.eye(HIDDEN)
    with torch.no_grad():
        # Landmark = 4 * mean(RMSNorm(chunk)); retrieval query = 4 * RMSNorm(x); memory V = RMSNorm(chunk tokens).
        layer.chunk_memory.landmark_proj.weight.copy_(4 * eye)
        layer.retrieval.query_proj.weight.copy_(4 * eye)
        layer.chunk_memory.value_proj.weight.copy_(eye[:16])  # Hk=1 head of dim 16: the first 16 coordinates
        layer.chunk_memory.key_proj.weight.copy_(eye[:16])
    return model.eval(), layer


def _hidden(query_matches: bool, seed: int = 0) -> torch.Tensor:
    """[s, 1, h]: background noise in coordinates 2..31; the needle chunk and (optionally) the query token carry e0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(SEQ, 1, HIDDEN)
    x[:, 0, 2:] = torch.randn(SEQ, HIDDEN - 2, generator=gen)
    needle = slice(NEEDLE_CHUNK * S, (NEEDLE_CHUNK + 1) * S)
    x[needle, 0, 0] = 20.0
    if query_matches:
        x[-1, 0, 0] = 20.0
    return x


def _run(model, layer, x):
    captured = {}
    h1 = layer.retrieval.register_forward_hook(lambda m, a, out: captured.__setitem__("selection", out))
    h2 = layer.cross_attention.register_forward_hook(lambda m, a, out: captured.__setitem__("attn_in", a))
    try:
        with torch.no_grad():
            model.decoder(hidden_states=x, attention_mask=None)
    finally:
        h1.remove()
        h2.remove()
    return captured


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_query_matching_a_far_landmark_selects_that_chunk(megatron_world, backend):
    model, layer = _needle_model(backend)
    got = _run(model, layer, _hidden(query_matches=True))
    sel = got["selection"]
    idx, w = sel.indices[0, -1, 0], sel.weights[0, -1, 0]  # last token, KV head 0: [K]
    assert NEEDLE_CHUNK in idx.tolist(), idx
    assert w[idx == NEEDLE_CHUNK].item() > 0.99
    # ... and the HSA output at that token carries the needle's value direction (coordinate 0 of head 0).
    hidden_in, memory = got["attn_in"]
    q = layer.cross_attention._queries(hidden_in)
    from megatron_ext.kernels.hsa import hsa_attention_reference

    o = hsa_attention_reference(q, memory.keys, memory.values, sel.weights, sel.indices, chunk_size=S)
    value = o[0, -1, 0]  # query head 0 of the last token: [16]
    assert torch.nn.functional.cosine_similarity(value, torch.eye(16)[0], dim=0) > 0.95

    # Control: the same sequence with a query that does not match gives the needle no dominant weight.
    control = _run(model, layer, _hidden(query_matches=False))["selection"]
    cidx, cw = control.indices[0, -1, 0], control.weights[0, -1, 0]
    assert float(cw[cidx == NEEDLE_CHUNK].sum()) < 0.9
