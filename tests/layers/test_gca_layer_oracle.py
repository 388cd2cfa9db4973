"""The GCA (DRT) retrieval layers against an independent oracle written from the spec's formulas (§4).

Only the chunk encoder, the inner SWA and the MLP are taken from the modules (each is tested on its own); the rest is
recomputed here in plain fp32 PyTorch, chunk by chunk and token by token:

* memory: RMSNorm(x) per chunk -> encoder; the landmark key of chunk e is the encoder output at its last row;
* retrieval (group head): query of chunk m = RMSNorm(x at m's landmark row), score <q_m, lmk_e> / sqrt(hidden) over
  e < m, top-k, softmax of the selected scores; that selection serves every token of chunk m + 1;
* GCA: K/V = W_k/W_v(encoder output) with a zero K/V landmark row, per-chunk softmax, weighted sum, W_o;
* layer: h = x + SWA(norm x); out = h + MLP(norm(h + GCA(norm h)))   (bypass residual).
"""

import math

import torch

from megatron_ext.models import build_model
from tests.models.tiny import tiny_config

S, SEQ, K = 8, 64, 3


def _rms(t, w, eps):
    return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps) * w


def _oracle_selection(q_land, landmarks, hidden):
    """Per QUERY chunk c: indices/weights made by chunk c - 1's landmark over chunks e < c - 1."""
    b, C, _ = landmarks.shape
    idx = torch.full((b, C, K), -1)
    w = torch.zeros(b, C, K)
    for bi in range(b):
        for c in range(2, C):
            m = c - 1
            scores = {e: float(q_land[bi, m] @ landmarks[bi, e]) / math.sqrt(hidden) for e in range(m)}
            top = sorted(sorted(scores, key=lambda e: -scores[e])[:K], reverse=True)
            idx[bi, c, : len(top)] = torch.tensor(top)
            w[bi, c, : len(top)] = torch.softmax(torch.tensor([scores[e] for e in top]), 0)
    return idx, w


def _oracle_layer(layer, x, keys, values, idx, w, config):
    eps, H, D = config.layernorm_epsilon, config.num_attention_heads, config.kv_channels
    G = H // keys.shape[-2]
    s, b, _ = x.shape
    attn, _ = layer.self_attention(layer.input_layernorm(x), attention_mask=None)
    h = x + attn
    ca = layer.cross_attention
    q = (_rms(h, layer.pre_cross_attn_layernorm.weight, eps) @ ca.query_proj.weight.T).reshape(s, b, H, D)
    o = torch.zeros(s, b, H, D)
    for bi in range(b):
        for t in range(s):
            for slot in range(K):
                e = int(idx[bi, t // S, slot])
                if e < 0:
                    continue
                for head in range(H):
                    kk, vv = keys[bi, e, :, head // G], values[bi, e, :, head // G]
                    p = torch.softmax(kk @ q[t, bi, head] / math.sqrt(D), 0)
                    o[t, bi, head] += w[bi, t // S, slot] * (p @ vv)
    gca = o.reshape(s, b, H * D) @ ca.output_proj.weight.T
    mlp, _ = layer.mlp(layer.pre_mlp_layernorm(h + gca))
    return h + mlp


def test_gca_group_matches_the_spec_oracle(megatron_world):
    config = tiny_config("swa [gca*2]", hsa_encoder_layers=2, num_query_groups=4, hsa_topk=K, hsa_chunk_size=S,
                         seq_length=SEQ, swa_alibi=True, position_embedding_type="none", gca_num_kv_heads=2)
    model = build_model(config).eval()
    first, second = model.decoder.layers[1], model.decoder.layers[2]
    seen = {}
    first.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", kw["hidden_states"]), with_kwargs=True)
    first.register_forward_hook(lambda m, a, kw, out: seen.__setitem__("first", out), with_kwargs=True)
    second.register_forward_hook(lambda m, a, kw, out: seen.__setitem__("second", out), with_kwargs=True)
    tokens = torch.randint(0, 97, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(tokens, torch.arange(SEQ).expand(2, SEQ), None)

        x = seen["x"]
        s, b, hidden = x.shape
        C, eps = s // S, config.layernorm_epsilon
        memory_module, retrieval = first.chunk_memory, first.retrieval
        chunks = _rms(x, memory_module.input_norm.weight, eps).reshape(C, S, b, hidden)
        encoded = memory_module.encoder(chunks.permute(1, 2, 0, 3).reshape(S, b * C, hidden))
        encoded = encoded.reshape(S, b, C, hidden).permute(1, 2, 0, 3)  # [b, C, S, h]
        landmarks = encoded[:, :, -1]
        q_land = _rms(x.reshape(C, S, b, hidden)[:, -1].transpose(0, 1), retrieval.landmark_query_norm.weight, eps)
        idx, w = _oracle_selection(q_land, landmarks, hidden)
        Hk, D = config.gca_kv_heads, config.kv_channels
        keys = (encoded @ retrieval.key_proj.weight.T).reshape(b, C, S, Hk, D)
        values = (encoded @ retrieval.value_proj.weight.T).reshape(b, C, S, Hk, D)
        keys[:, :, -1] = 0  # the landmark row: a null logit 0 with a zero value
        values[:, :, -1] = 0

        out_first, memory = seen["first"]
        sel = memory.selection
        assert torch.equal(sel.indices.long(), idx), (sel.indices, idx)
        torch.testing.assert_close(sel.weights, w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(memory.landmarks, landmarks, rtol=1e-5, atol=1e-6)
        # The first retrieval layer builds the memory and retrieves; the second reuses both.
        torch.testing.assert_close(out_first, _oracle_layer(first, x, keys, values, idx, w, config),
                                   rtol=1e-5, atol=1e-5)
        out_second, _ = seen["second"]
        torch.testing.assert_close(out_second, _oracle_layer(second, out_first, keys, values, idx, w, config),
                                   rtol=1e-5, atol=1e-5)
        # Retrieval is live: some chunks attend to more than one earlier chunk with non-trivial weights.
        assert (w > 0.05).sum(-1).max() >= 2
