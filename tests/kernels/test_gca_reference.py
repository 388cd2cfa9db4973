"""The PyTorch GCA reference against loop-by-loop oracles written straight from the definition."""

import math

import pytest
import torch

from megatron_ext.kernels.gca import gca_attention, gca_decode, gca_retrieval, selection_for_query_chunks
from megatron_ext.kernels.gca.reference import gca_attention_reference


def loop_retrieval(qlm, lm, topk, doc=None):
    """Per chunk: eligible earlier chunks, best `topk` by score, most recent first, softmax of their scores."""
    B, C, Dr = lm.shape
    idx = torch.full((B, C, topk), -1, dtype=torch.int32)
    w = torch.zeros(B, C, topk, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            cands = [e for e in range(c) if doc is None or doc[e] == doc[c]]
            scores = {e: float(qlm[b, c].double() @ lm[b, e].double()) / math.sqrt(Dr) for e in cands}
            best = sorted(cands, key=lambda e: -scores[e])[:topk]
            best.sort(reverse=True)
            if best:
                s = torch.tensor([scores[e] for e in best], dtype=torch.float64)
                idx[b, c, : len(best)] = torch.tensor(best, dtype=torch.int32)
                w[b, c, : len(best)] = torch.softmax(s, 0)
    return idx, w


def loop_attention(q, k, v, weights, indices, S, off_by_one=False, null_slot=False):
    """Token by token, head by head, slot by slot."""
    B, L, Hq, D = q.shape
    Lkv, Hk = k.shape[1], k.shape[2]
    G = Hq // Hk
    out = torch.zeros(B, L, Hq, D, dtype=torch.float64)
    for b in range(B):
        for t in range(L):
            c = t // S
            for hq in range(Hq):
                h = hq // G
                for slot in range(indices.shape[-1]):
                    e = int(indices[b, c, slot])
                    if e < 0:
                        continue
                    rows = [r for r in range(e * S, (e + 1) * S) if r < Lkv]
                    kk = k[b, rows, h].double().clone()
                    vv = v[b, rows, h].double().clone()
                    if null_slot and (e + 1) * S - 1 < Lkv:
                        kk[-1] = 0
                        vv[-1] = 0
                    s = kk @ q[b, t, hq].double() / math.sqrt(D)
                    m = s.max()
                    if off_by_one:
                        m = torch.maximum(m, torch.zeros(()))
                    p = torch.exp(s - m)
                    denom = p.sum() + (torch.exp(-m) if off_by_one else 0)
                    out[b, t, hq] += float(weights[b, c, slot]) * (p / denom) @ vv
    return out


def test_retrieval_matches_loop_oracle():
    torch.manual_seed(0)
    B, C, Dr, K = 2, 7, 16, 3
    qlm, lm = torch.randn(B, C, Dr), torch.randn(B, C, Dr)
    idx, w = gca_retrieval(qlm, lm, topk=K)
    ref_idx, ref_w = loop_retrieval(qlm, lm, K)
    assert idx.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("K", [3, 9])
def test_decode_retrieval_is_the_completed_chunks_row_of_the_loop_oracle(K):
    from megatron_ext.kernels.gca import gca_decode_retrieval

    torch.manual_seed(5)
    B, C, Dr = 2, 8, 16
    qlm, lm = torch.randn(B, C, Dr), torch.randn(B, C, Dr)
    ref_idx, ref_w = loop_retrieval(qlm, lm, K)
    for c in range(1, C):  # chunk c just completed: its query against the c landmarks before it
        idx, w = gca_decode_retrieval(qlm[:, c], lm[:, :c], topk=K)
        assert idx.dtype == torch.int32 and w.dtype == torch.float32
        assert torch.equal(idx, ref_idx[:, c])
        torch.testing.assert_close(w.double(), ref_w[:, c], atol=1e-6, rtol=1e-5)


def test_retrieval_topk_larger_than_chunks_pads_with_empty_slots():
    torch.manual_seed(1)
    qlm, lm = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    idx, w = gca_retrieval(qlm, lm, topk=5)
    assert idx.shape == (1, 3, 5)
    assert (idx[0, 0] == -1).all() and (w[0, 0] == 0).all()
    assert idx[0, 2].tolist() == [1, 0, -1, -1, -1]
    torch.testing.assert_close(w[0, 1:].sum(-1), torch.ones(2))


def test_retrieval_gumbel_selects_valid_distinct_chunks_and_gets_gradients():
    torch.manual_seed(2)
    B, C, Dr, K = 1, 12, 8, 4
    qlm = torch.randn(B, C, Dr, requires_grad=True)
    lm = torch.randn(B, C, Dr, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    idx, w = gca_retrieval(qlm, lm, topk=K, gumbel=True, generator=gen)
    gen2 = torch.Generator().manual_seed(3)
    idx2, _ = gca_retrieval(qlm, lm, topk=K, gumbel=True, generator=gen2)
    assert torch.equal(idx, idx2)
    for c in range(C):
        sel = [int(e) for e in idx[0, c] if e >= 0]
        assert len(sel) == min(K, c) and len(set(sel)) == len(sel)
        assert all(e < c for e in sel) and sel == sorted(sel, reverse=True)
    # Noise changes the choice somewhere but the weights stay the noise-free softmax of the chosen scores.
    scores = (qlm @ lm.transpose(1, 2) / math.sqrt(Dr)).detach()
    c = C - 1
    chosen = idx[0, c].long()
    torch.testing.assert_close(w[0, c], torch.softmax(scores[0, c, chosen], 0))
    (w * torch.randn_like(w)).sum().backward()
    assert qlm.grad.abs().sum() > 0 and lm.grad.abs().sum() > 0


def test_packed_retrieval_never_crosses_a_document_and_matches_per_document_runs():
    torch.manual_seed(4)
    S, K, Dr = 4, 3, 8
    doc_chunks = [3, 5, 2]
    C = sum(doc_chunks)
    cu = torch.tensor([0, 12, 32, 40])
    qlm, lm = torch.randn(1, C, Dr), torch.randn(1, C, Dr)
    idx, w = gca_retrieval(qlm, lm, topk=K, chunk_size=S, cu_seqlens=cu)
    doc = [0] * 3 + [1] * 5 + [2] * 2
    ref_idx, ref_w = loop_retrieval(qlm, lm, K, doc=doc)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w.double(), ref_w, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk boundary"):
        gca_retrieval(qlm, lm, topk=K, chunk_size=S, cu_seqlens=torch.tensor([0, 10, 40]))


def test_selection_for_query_chunks_shifts_by_one_chunk_and_resets_at_documents():
    idx = torch.arange(12, dtype=torch.int32).view(1, 6, 2)
    w = torch.rand(1, 6, 2)
    sidx, sw = selection_for_query_chunks(idx, w)
    assert (sidx[0, 0] == -1).all() and (sw[0, 0] == 0).all()
    assert torch.equal(sidx[0, 1:], idx[0, :-1]) and torch.equal(sw[0, 1:], w[0, :-1])
    sidx, sw = selection_for_query_chunks(idx, w, chunk_size=4, cu_seqlens=torch.tensor([0, 12, 24]))
    assert (sidx[0, 3] == -1).all() and (sw[0, 3] == 0).all()
    assert torch.equal(sidx[0, 4], idx[0, 3])


def random_selection(B, C_q, C_kv, K, generator=None, gap=1):
    """Causal random selection for query chunk c: distinct chunks among e <= c - gap, -1 where there are too few."""
    idx = torch.full((B, C_q, K), -1, dtype=torch.int32)
    for b in range(B):
        for c in range(C_q):
            n = max(0, min(c - gap + 1, C_kv))
            perm = torch.randperm(n, generator=generator)[:K].sort(descending=True).values
            idx[b, c, : len(perm)] = perm.to(torch.int32)
    w = torch.softmax(torch.randn(B, C_q, K, generator=generator), -1) * (idx >= 0)
    return idx, w


@pytest.mark.parametrize("off_by_one,null_slot", [(False, False), (True, False), (False, True)])
def test_attention_reference_matches_loop_oracle(off_by_one, null_slot):
    torch.manual_seed(5)
    B, S, Hq, Hk, D, K = 2, 4, 4, 2, 8, 3
    L, Lkv = 19, 18  # partial last query chunk, partial last kv chunk
    q, k, v = torch.randn(B, L, Hq, D), torch.randn(B, Lkv, Hk, D), torch.randn(B, Lkv, Hk, D)
    idx, w = random_selection(B, -(-L // S), -(-Lkv // S), K)
    out = gca_attention(q, k, v, w, idx, chunk_size=S, softmax_off_by_one=off_by_one,
                        landmark_null_slot=null_slot, backend="reference")
    ref = loop_attention(q, k, v, w, idx, S, off_by_one, null_slot)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_null_slot_equals_zeroed_last_rows_and_its_kv_get_no_gradient():
    torch.manual_seed(6)
    B, S, H, D, K, L = 1, 4, 2, 8, 2, 16
    q = torch.randn(B, L, H, D)
    k = torch.randn(B, L, H, D, requires_grad=True)
    v = torch.randn(B, L, H, D, requires_grad=True)
    idx, w = random_selection(B, L // S, L // S, K)
    out = gca_attention_reference(q, k, v, w, idx, chunk_size=S, landmark_null_slot=True)
    zero_last = torch.ones(L, 1, 1)
    zero_last[S - 1 :: S] = 0
    ref = gca_attention_reference(q, k * zero_last, v * zero_last, w, idx, chunk_size=S)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert (k.grad[:, S - 1 :: S] == 0).all() and (v.grad[:, S - 1 :: S] == 0).all()
    assert k.grad.abs().sum() > 0


def test_attention_weights_gradient_is_per_chunk_output_dot_upstream():
    torch.manual_seed(7)
    B, S, H, D, K, L = 1, 4, 2, 8, 2, 12
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, L, H, D), torch.randn(B, L, H, D)
    idx, w = random_selection(B, L // S, L // S, K)
    w = w.requires_grad_()
    do = torch.randn(B, L, H, D)
    (gca_attention_reference(q, k, v, w, idx, chunk_size=S) * do).sum().backward()
    # dw[c, slot] = sum over the chunk's tokens and heads of <O_slot, dO>, O_slot the unweighted chunk output.
    for c in range(L // S):
        for slot in range(K):
            one_hot = torch.zeros_like(w)
            one_hot[0, c, slot] = 1.0
            o_slot = gca_attention_reference(q, k, v, one_hot, idx, chunk_size=S)
            expected = (o_slot * do)[:, c * S : (c + 1) * S].sum()
            torch.testing.assert_close(w.grad[0, c, slot], expected, atol=1e-5, rtol=1e-5)


def test_indices_past_the_kv_chunks_are_empty_slots():
    """Indices >= ceil(Lkv/S) are skipped like -1 (as the kernels do): same output and gradients whatever their
    weight, weight gradient 0; decode likewise."""
    torch.manual_seed(8)
    B, S, H, D, K, L, Lkv = 2, 4, 2, 8, 3, 20, 18  # 5 KV chunks, the last one partial
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, Lkv, H, D), torch.randn(B, Lkv, H, D)
    idx, w = random_selection(B, L // S, -(-Lkv // S), K)
    empty = idx < 0
    idx_far = torch.where(empty, torch.tensor([5, 105], dtype=idx.dtype)[torch.arange(K) % 2], idx)
    w_far = torch.where(empty, torch.full_like(w, 0.5), w)
    grads = []
    for selection in (idx_far, idx):
        xs = [x.clone().requires_grad_() for x in (q, k, v, w_far)]
        out = gca_attention_reference(*xs[:4], selection, chunk_size=S)
        out.square().sum().backward()
        grads.append([out] + [x.grad for x in xs])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (grads[0][-1][empty] == 0).all()
    dec = [gca_decode(q[:, -2:], k, v, w_far[:, -1], sel[:, -1], chunk_size=S, backend="reference")
           for sel in (idx_far, idx)]
    torch.testing.assert_close(dec[0], dec[1], rtol=0, atol=0)


def test_decode_reference_equals_training_reference_on_the_last_tokens():
    torch.manual_seed(8)
    B, S, Hq, Hk, D, K, L = 2, 4, 4, 1, 8, 2, 22
    q, k, v = torch.randn(B, L, Hq, D), torch.randn(B, L, Hk, D), torch.randn(B, L, Hk, D)
    idx, w = random_selection(B, -(-L // S), -(-L // S), K)
    full = gca_attention(q, k, v, w, idx, chunk_size=S, backend="reference")
    # The last two tokens (20, 21) lie in query chunk 5: decode them against the cache of complete chunks.
    dec = gca_decode(q[:, 20:22], k[:, :20], v[:, :20], w[:, 5], idx[:, 5], chunk_size=S, backend="reference")
    torch.testing.assert_close(dec, full[:, 20:22])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_decode_before_any_complete_chunk_gives_zeros(backend):
    # a generation's first tokens: no chunk in the cache, every slot empty, as the training form gives chunk 0
    torch.manual_seed(9)
    q, kv = torch.randn(2, 1, 4, 16), torch.randn(2, 0, 2, 16)
    idx, w = torch.full((2, 3), -1, dtype=torch.int32), torch.zeros(2, 3)
    out = gca_decode(q, kv, kv, w, idx, chunk_size=8, backend=backend)
    assert out.shape == q.shape and (out == 0).all()


def test_attention_rejects_bad_shapes_with_clear_errors():
    q, k = torch.randn(1, 16, 4, 32), torch.randn(1, 16, 3, 32)
    idx, w = torch.zeros(1, 4, 2, dtype=torch.int32), torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        gca_attention(q, k, k, w, idx, chunk_size=4)
    k = torch.randn(1, 16, 2, 32)
    with pytest.raises(ValueError, match="ceil"):
        gca_attention(q, k, k, w[:, :3], idx[:, :3], chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        gca_attention(q, k, k, w[:, :2], idx[:, :2], chunk_size=12, backend="triton")
