"""GCA Triton kernels (forward, backward, decode) against the PyTorch reference.

On CPU these run in the Triton interpreter (fp32 / fp16, tiny shapes); the bf16 tests at realistic shapes need a GPU.
"""

import pytest
import torch

from megatron_ext.kernels.gca import gca_attention, gca_decode, gca_retrieval, selection_for_query_chunks
from megatron_ext.kernels.gca.reference import gca_attention_reference, gca_decode_reference
from megatron_ext.kernels.gca.triton_attention import reverse_index
from tests.kernels.common import DEVICE, rel_err

TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def causal_selection(B, num_q_chunks, num_kv_chunks, K, gen, empty_every=0):
    """Random selection for query chunk c among chunks e <= c - 2 (the retrieval made by c-1 sees e < c-1), most
    recent first, -1 where fewer exist; `empty_every` blanks some slots in the middle to exercise -1 anywhere."""
    idx = torch.full((B, num_q_chunks, K), -1, dtype=torch.int32)
    for b in range(B):
        for c in range(num_q_chunks):
            n = max(0, min(c - 1, num_kv_chunks))
            pick = torch.randperm(n, generator=gen)[:K].sort(descending=True).values
            idx[b, c, : len(pick)] = pick.to(torch.int32)
    if empty_every:
        idx.view(-1)[::empty_every] = -1
    w = torch.softmax(torch.randn(B, num_q_chunks, K, generator=gen), -1) * (idx >= 0)
    return idx, w


def random_selection(B, num_q_chunks, num_kv_chunks, K, gen):
    """Any K distinct chunks for every query chunk (the kernels do not assume causality)."""
    idx = torch.stack([
        torch.stack([torch.randperm(num_kv_chunks, generator=gen)[:K] for _ in range(num_q_chunks)])
        for _ in range(B)
    ]).to(torch.int32)
    w = torch.softmax(torch.randn(B, num_q_chunks, K, generator=gen), -1)
    return idx, w


def run_and_compare(q, k, v, w, idx, S, dtype, off_by_one=False, null_slot=False, check_grads=True):
    q, k, v = (x.to(DEVICE, dtype).requires_grad_() for x in (q, k, v))
    w = w.to(DEVICE).requires_grad_()
    idx = idx.to(DEVICE)
    opts = dict(chunk_size=S, softmax_off_by_one=off_by_one, landmark_null_slot=null_slot)
    out = gca_attention(q, k, v, w, idx, backend="triton", **opts)
    # The oracle runs in fp32 on the same (rounded) inputs.
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    w32 = w.detach().clone().requires_grad_()
    ref = gca_attention_reference(q32, k32, v32, w32, idx, **opts)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < TOL[dtype], ("o", rel_err(out, ref))
    if not check_grads:
        return
    do = torch.randn_like(ref)
    out.backward(do.to(dtype))
    ref.backward(do)
    for name, got, want in (("dq", q.grad, q32.grad), ("dk", k.grad, k32.grad), ("dv", v.grad, v32.grad),
                            ("dw", w.grad, w32.grad)):
        assert got.dtype == (torch.float32 if name == "dw" else dtype)
        assert rel_err(got, want) < TOL[dtype], (name, rel_err(got, want))


# Each case: (S, D, Hq, Hk, K, B, L, Lkv, dtype). Lengths are not multiples of the chunk (partial last query chunk,
# partial last KV chunk) in most cases; G = Hq/Hk covers 1 (DRT's MHA), 2, 4.
CPU_CASES = [
    pytest.param(32, 32, 2, 2, 3, 2, 200, 190, torch.float32, id="S32-D32-mha-B2-partial"),
    pytest.param(64, 64, 4, 1, 2, 1, 300, 256, torch.float32, id="S64-D64-G4"),
    pytest.param(128, 128, 2, 1, 2, 1, 300, 300, torch.float32, id="S128-D128-G2-partial"),
    pytest.param(32, 64, 4, 2, 4, 1, 170, 160, torch.float16, id="S32-D64-G2-fp16"),
]


@pytest.mark.parametrize("S,D,Hq,Hk,K,B,L,Lkv,dtype", CPU_CASES)
def test_triton_matches_reference(S, D, Hq, Hk, K, B, L, Lkv, dtype):
    gen = torch.Generator().manual_seed(S + D + K)
    q, k, v = torch.randn(B, L, Hq, D), torch.randn(B, Lkv, Hk, D), torch.randn(B, Lkv, Hk, D)
    idx, w = causal_selection(B, -(-L // S), -(-Lkv // S), K, gen, empty_every=7)
    run_and_compare(q, k, v, w, idx, S, dtype)


@pytest.mark.parametrize("off_by_one,null_slot", [(True, False), (False, True), (True, True)])
def test_triton_off_by_one_and_landmark_null_slot(off_by_one, null_slot):
    gen = torch.Generator().manual_seed(11)
    S, D, H, K, L = 32, 32, 2, 2, 160
    # Large logits make the off-by-one term visible only if it is really in the denominator.
    q, k, v = 3 * torch.randn(1, L, H, D), torch.randn(1, L, H, D), torch.randn(1, L, H, D)
    idx, w = causal_selection(1, L // S, L // S, K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.float32, off_by_one, null_slot)
    if off_by_one:
        plain = gca_attention(q, k, v, w, idx, chunk_size=S, landmark_null_slot=null_slot, backend="triton")
        with_null = gca_attention(q, k, v, w, idx, chunk_size=S, softmax_off_by_one=True,
                                  landmark_null_slot=null_slot, backend="triton")
        assert rel_err(plain, with_null) > 1e-3  # the option is not silently dropped


def test_fused_backward_schedule_matches_reference(monkeypatch):
    """The alternative backward (one KV-centric kernel, dQ by atomics) gives the same gradients."""
    monkeypatch.setenv("GCA_BWD", "fused")
    gen = torch.Generator().manual_seed(10)
    S, D, Hq, Hk, K, L = 32, 32, 4, 2, 3, 150
    q, k, v = torch.randn(1, L, Hq, D), torch.randn(1, L, Hk, D), torch.randn(1, L, Hk, D)
    idx, w = causal_selection(1, -(-L // S), -(-L // S), K, gen, empty_every=5)
    run_and_compare(q, k, v, w, idx, S, torch.float32, off_by_one=True)


def test_triton_topk_64_against_many_chunks():
    gen = torch.Generator().manual_seed(12)
    S, D, H, K = 32, 32, 1, 64
    L, Lkv = 64, 66 * S
    q, k, v = torch.randn(1, L, H, D), torch.randn(1, Lkv, H, D), torch.randn(1, Lkv, H, D)
    idx, w = random_selection(1, L // S, Lkv // S, K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.float32)


def test_triton_topk_1():
    gen = torch.Generator().manual_seed(13)
    S, D, H, K, L = 32, 64, 2, 1, 128
    q, k, v = torch.randn(1, L, H, D), torch.randn(1, L, H, D), torch.randn(1, L, H, D)
    idx, w = causal_selection(1, L // S, L // S, K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.float32)


def test_packed_documents_equal_separate_runs_end_to_end():
    """Retrieval with cu_seqlens + shift + attention on a packed batch equals running each document alone."""
    gen = torch.Generator().manual_seed(14)
    S, D, H, K, Dr = 32, 32, 2, 2, 16
    doc_lens = [96, 128, 70]  # every document starts on a chunk boundary; the last one ends mid-chunk
    starts = [0, 96, 224]
    total = 294
    cu = torch.tensor(starts + [total])
    q, k, v = torch.randn(1, total, H, D), torch.randn(1, total, H, D), torch.randn(1, total, H, D)
    C = -(-total // S)
    qlm, lm = torch.randn(1, C, Dr, generator=gen), torch.randn(1, C, Dr, generator=gen)
    qlm.requires_grad_()
    sel_idx, sel_w = gca_retrieval(qlm, lm, topk=K, chunk_size=S, cu_seqlens=cu)
    idx, w = selection_for_query_chunks(sel_idx, sel_w, chunk_size=S, cu_seqlens=cu)
    packed = gca_attention(q, k, v, w, idx, chunk_size=S, backend="triton")
    packed.sum().backward()
    assert qlm.grad.abs().sum() > 0  # end-to-end: retrieval scores get gradients through the attention
    for start, n in zip(starts, doc_lens):
        c0, c1 = start // S, -(-(start + n) // S)
        d_idx, d_w = gca_retrieval(qlm[:, c0:c1].detach(), lm[:, c0:c1], topk=K)
        d_idx, d_w = selection_for_query_chunks(d_idx, d_w)
        sl = slice(start, start + n)
        alone = gca_attention(q[:, sl], k[:, sl], v[:, sl], d_w, d_idx, chunk_size=S, backend="triton")
        assert rel_err(packed[:, sl], alone) < 1e-5


def test_indices_past_the_kv_chunks_are_empty_slots_on_both_backends():
    """An index >= ceil(Lkv/S) is an empty slot in the kernels and in the reference alike (output and gradients),
    also one whose first row e*S would overflow int32."""
    gen = torch.Generator().manual_seed(9)
    S, D, L, Lkv = 16, 16, 64, 40  # 3 KV chunks, the last one partial
    q, k, v = (torch.randn(1, n, 2, D, generator=gen) for n in (L, Lkv, Lkv))
    idx, w = causal_selection(1, L // S, -(-Lkv // S), 2, gen)
    empty = idx < 0
    idx = torch.where(empty, torch.tensor([3, 2**28 + 1], dtype=idx.dtype)[torch.arange(2) % 2], idx)
    assert (idx >= 3).any()
    run_and_compare(q, k, v, torch.where(empty, torch.full_like(w, 0.5), w), idx, S, torch.float32)


def test_reverse_index_lists_every_selection_once():
    idx = torch.tensor([[[1, 0, -1], [2, 1, 0]], [[0, -1, -1], [1, 0, -1]]], dtype=torch.int32)
    offsets, entries = reverse_index(idx, num_kv_chunks=3)
    seen = set()
    for b in range(2):
        for e in range(3):
            lo, hi = int(offsets[b * 3 + e]), int(offsets[b * 3 + e + 1])
            for entry in entries[lo:hi].tolist():
                c, slot = divmod(entry, 3)
                assert int(idx[b, c, slot]) == e
                seen.add((b, c, slot))
    assert seen == {(b, c, s) for b in range(2) for c in range(2) for s in range(3) if idx[b, c, s] >= 0}


@pytest.mark.parametrize("T,shared", [(1, True), (2, True), (2, False)])
def test_decode_kernel_matches_reference(T, shared):
    gen = torch.Generator().manual_seed(15 + T)
    B, S, D, Hq, Hk, K, Lc = 2, 32, 64, 4, 2, 3, 150
    q = torch.randn(B, T, Hq, D)
    kc, vc = torch.randn(B, Lc, Hk, D), torch.randn(B, Lc, Hk, D)
    shape = (B, K) if shared else (B, T, K)
    idx = torch.randint(0, -(-Lc // S), shape, generator=gen).to(torch.int32)
    idx[..., -1] = -1
    w = torch.rand(shape, generator=gen)
    for off_by_one, null_slot in ((False, False), (True, True)):
        opts = dict(chunk_size=S, softmax_off_by_one=off_by_one, landmark_null_slot=null_slot)
        out = gca_decode(q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), w.to(DEVICE), idx.to(DEVICE),
                         backend="triton", **opts)
        ref = gca_decode_reference(q, kc, vc, w, idx, **opts)
        assert rel_err(out.cpu(), ref) < 1e-4


def test_decode_equals_training_forward_on_the_last_tokens():
    gen = torch.Generator().manual_seed(16)
    B, S, D, H, K, L = 1, 32, 32, 2, 2, 130  # tokens 128, 129 lie in query chunk 4
    q, k, v = torch.randn(B, L, H, D), torch.randn(B, L, H, D), torch.randn(B, L, H, D)
    idx, w = causal_selection(B, -(-L // S), -(-L // S), K, gen)
    full = gca_attention(q, k, v, w, idx, chunk_size=S, backend="triton")
    dec = gca_decode(q[:, 128:], k[:, :128], v[:, :128], w[:, 4], idx[:, 4], chunk_size=S, backend="triton")
    assert rel_err(dec, full[:, 128:]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# GPU (bf16, realistic shapes)
# ---------------------------------------------------------------------------------------------------------------

GPU_CASES = [
    pytest.param(64, 64, 12, 12, 8, 2, 4000, 4000, id="drt-S64-D64-H12-mha-B2"),
    pytest.param(64, 128, 16, 1, 8, 1, 4096, 4096, id="S64-D128-Hq16-Hk1"),
    pytest.param(64, 128, 16, 16, 8, 1, 3000, 3000, id="S64-D128-Hq16-mha"),
    pytest.param(32, 32, 8, 2, 16, 1, 2500, 2500, id="S32-D32-G4-K16"),
    pytest.param(128, 128, 4, 2, 4, 2, 3000, 2944, id="S128-D128-G2"),
    pytest.param(64, 64, 4, 4, 64, 1, 8192, 8192, id="S64-K64"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("S,D,Hq,Hk,K,B,L,Lkv", GPU_CASES)
def test_gpu_bf16_matches_reference(S, D, Hq, Hk, K, B, L, Lkv):
    gen = torch.Generator().manual_seed(S * D + K)
    q, k, v = torch.randn(B, L, Hq, D), torch.randn(B, Lkv, Hk, D), torch.randn(B, Lkv, Hk, D)
    idx, w = causal_selection(B, -(-L // S), -(-Lkv // S), K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("off_by_one,null_slot", [(True, False), (False, True)])
def test_gpu_bf16_options(off_by_one, null_slot):
    gen = torch.Generator().manual_seed(21)
    S, D, H, K, L = 64, 64, 12, 8, 2048
    q, k, v = torch.randn(1, L, H, D), torch.randn(1, L, H, D), torch.randn(1, L, H, D)
    idx, w = causal_selection(1, L // S, L // S, K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.bfloat16, off_by_one, null_slot)


@pytest.mark.gpu
def test_gpu_bf16_fused_backward_schedule(monkeypatch):
    monkeypatch.setenv("GCA_BWD", "fused")
    gen = torch.Generator().manual_seed(24)
    S, D, Hq, Hk, K, L = 64, 128, 16, 4, 8, 3000
    q, k, v = torch.randn(1, L, Hq, D), torch.randn(1, L, Hk, D), torch.randn(1, L, Hk, D)
    idx, w = causal_selection(1, -(-L // S), -(-L // S), K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_fp16_and_fp32():
    gen = torch.Generator().manual_seed(22)
    S, D, Hq, Hk, K, L = 64, 128, 8, 2, 8, 2048
    q, k, v = torch.randn(1, L, Hq, D), torch.randn(1, L, Hk, D), torch.randn(1, L, Hk, D)
    idx, w = causal_selection(1, L // S, L // S, K, gen)
    run_and_compare(q, k, v, w, idx, S, torch.float16)
    run_and_compare(q, k, v, w, idx, S, torch.float32)


@pytest.mark.gpu
def test_gpu_bf16_decode():
    gen = torch.Generator().manual_seed(23)
    B, S, D, Hq, Hk, K, Lc = 4, 64, 128, 16, 1, 8, 8192
    q = torch.randn(B, 2, Hq, D)
    kc, vc = torch.randn(B, Lc, Hk, D), torch.randn(B, Lc, Hk, D)
    idx = torch.stack([torch.randperm(Lc // S, generator=gen)[:K] for _ in range(B)]).to(torch.int32)
    w = torch.softmax(torch.randn(B, K, generator=gen), -1)
    cast = lambda x: x.to(DEVICE, torch.bfloat16)  # noqa: E731
    out = gca_decode(cast(q), cast(kc), cast(vc), w.to(DEVICE), idx.to(DEVICE), chunk_size=S)
    ref = gca_decode_reference(cast(q).float().cpu(), cast(kc).float().cpu(), cast(vc).float().cpu(), w, idx,
                               chunk_size=S)
    assert rel_err(out.float().cpu(), ref) < TOL[torch.bfloat16]


def test_sizes_the_kernels_do_not_cover_run_on_the_reference_under_auto():
    """Chunk 12 and head dim 24 are outside the Triton tiles: "auto" gives the reference's output (and gradients
    through it), "triton" names the limit."""
    gen = torch.Generator().manual_seed(3)
    for S, D in ((12, 32), (16, 24)):
        L = 4 * S
        q, k, v = (torch.randn(1, L, 2, D, generator=gen) for _ in range(3))
        idx, w = causal_selection(1, 4, 4, 2, gen)
        out = gca_attention(q, k, v, w, idx, chunk_size=S)  # conftest: "auto" means Triton on CPU here
        torch.testing.assert_close(out, gca_attention_reference(q, k, v, w, idx, chunk_size=S))
        with pytest.raises(ValueError, match="for the Triton kernels"):
            gca_attention(q, k, v, w, idx, chunk_size=S, backend="triton")
