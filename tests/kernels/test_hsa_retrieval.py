"""HSA retrieval: the reference's rules spelled out, and the Triton streaming top-k + weights against it."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.kernels.hsa import hsa_retrieval, hsa_retrieval_reference
from megatron_ext.kernels.hsa.reference import chunk_weights, eligibility_mask, retrieval_scores
from tests.kernels.common import DEVICE, rel_err

REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def inputs(B, L, R, Dr, S, dtype, seed=0, extra_chunks=1):
    gen = torch.Generator().manual_seed(seed)
    C = L // S + extra_chunks  # the landmark of the (incomplete) last chunk may exist: never eligible
    q_r = torch.randn(B, L, R, Dr, generator=gen).to(dtype).to(DEVICE)
    lmk = torch.randn(B, C, R, Dr, generator=gen).to(dtype).to(DEVICE)
    return q_r, lmk


def assert_selection_valid(idx, L, S, topk, lo=None):
    """Distinct eligible chunks, most recent first, -1 only at the end, as many as available."""
    idx = idx.cpu().long()
    t = torch.arange(L)[None, :, None, None]
    valid = idx >= 0
    assert ((idx + 1) * S <= t)[valid].all(), "a chunk that is not complete and in the past was selected"
    if lo is not None:
        assert (idx >= lo[None, :, None, None])[valid].all(), "retrieval crossed a document boundary"
    assert (idx[..., 1:] < idx[..., :-1])[valid[..., 1:]].all(), "slots are not strictly most-recent-first"
    assert (~valid[..., :-1] & valid[..., 1:]).sum() == 0, "a valid slot follows an invalid one"
    n_elig = (t[..., 0] // S) - (0 if lo is None else lo[None, :, None])
    assert torch.equal(valid.sum(-1), n_elig.clamp(min=0, max=topk).expand_as(valid[..., 0]))


# ---------------------------------------------------------------- reference rules


def test_eligibility_is_complete_past_chunks_of_the_same_document():
    S = 4
    mask = eligibility_mask(20, 5, S)
    assert not mask[:4].any() and mask[4, 0] and not mask[7, 1] and mask[8, 1] and mask[19, 3] and not mask[19, 4]
    mask = eligibility_mask(20, 5, S, cu_seqlens=torch.tensor([0, 8, 20]))
    assert mask[7, 0] and not mask[8, 0] and not mask[11, 1] and mask[12, 2] and not mask[19, 1]
    with pytest.raises(ValueError, match="chunk boundary"):
        eligibility_mask(20, 5, S, cu_seqlens=torch.tensor([0, 6, 20]))


def test_weight_rules_closed_forms():
    s = torch.tensor([[0.5, -1.0, 2.0, 0.0]])
    valid = torch.tensor([[True, True, True, False]])
    w = chunk_weights(s, valid, "softmax")
    assert torch.allclose(w[0, :3], torch.softmax(s[0, :3], 0)) and w[0, 3] == 0
    w = chunk_weights(s, valid, "softmax", rank_decay=0.5)
    assert torch.allclose(w[0, :3], torch.softmax(s[0, :3] + 0.5 * torch.arange(3.0), 0))
    w = chunk_weights(s, valid, "stick_breaking")
    sig = torch.sigmoid(s[0])
    assert torch.allclose(w[0, :3], torch.stack([sig[0], sig[1] * (1 - sig[0]), sig[2] * (1 - sig[0]) * (1 - sig[1])]))
    assert w[0, 3] == 0 and w.sum() < 1
    none = chunk_weights(s, torch.zeros_like(valid), "softmax")
    assert torch.equal(none, torch.zeros_like(none))


@pytest.mark.parametrize("weight_rule", ["softmax", "stick_breaking"])
@pytest.mark.parametrize("decay", [None, 0.3, "tensor"])
def test_chunk_weights_kernel_matches_reference(weight_rule, decay):
    """The weights kernel (forward and backward) against ``chunk_weights``: K = 5, rows not a multiple of the
    block, invalid slots anywhere (and rows with none valid), scores large enough for softplus's linear branch."""
    from megatron_ext.kernels.hsa.retrieval import ChunkWeights

    gen = torch.Generator().manual_seed(3)
    N, K = 300, 5
    scores = (torch.randn(N, K, generator=gen) * 8).to(DEVICE)
    idx = torch.randint(0, 50, (N, K), generator=gen, dtype=torch.int32)
    idx[torch.rand(N, K, generator=gen) < 0.3] = -1
    idx[:3] = -1
    idx = idx.to(DEVICE)
    dw = torch.randn(N, K, generator=gen).to(DEVICE)
    results = []
    for fn in (ChunkWeights.apply, lambda s, i, r, d: chunk_weights(s, i >= 0, r, d)):
        s = scores.clone().requires_grad_()
        d = torch.tensor([0.3], device=DEVICE, requires_grad=True) if decay == "tensor" else decay
        w = fn(s, idx, weight_rule, d)
        grads = torch.autograd.grad(w, [s] + ([d] if decay == "tensor" else []), dw)
        results.append((w, *grads))
    (w, *g), (w_ref, *g_ref) = results
    assert (w[idx < 0] == 0).all() and (w[:3] == 0).all()
    assert rel_err(w, w_ref) < 1e-6
    for a, b in zip(g, g_ref):
        assert a.shape == b.shape and rel_err(a, b) < 1e-5


def test_reference_selects_the_top_scores_most_recent_first():
    B, L, R, Dr, S, K = 1, 50, 2, 8, 8, 3
    q_r, lmk = (x.cpu() for x in inputs(B, L, R, Dr, S, torch.float32))
    idx, w = hsa_retrieval_reference(q_r, lmk, chunk_size=S, topk=K)
    assert_selection_valid(idx, L, S, K)
    scores = retrieval_scores(q_r, lmk).masked_fill(~eligibility_mask(L, lmk.shape[1], S)[None, :, None], -math.inf)
    for t in (9, 30, 49):
        for r in range(R):
            n = min(K, t // S)
            want = scores[0, t, r].topk(n).indices.sort(descending=True).values
            assert idx[0, t, r, :n].tolist() == want.tolist()
            assert torch.allclose(w[0, t, r, :n], torch.softmax(scores[0, t, r, want], 0))


def test_reference_gumbel_noise_changes_the_choice_not_the_weight_rule():
    B, L, R, Dr, S, K = 1, 60, 1, 8, 4, 2
    q_r, lmk = (x.cpu() for x in inputs(B, L, R, Dr, S, torch.float32))
    noise = torch.zeros(B, L, R, lmk.shape[1])
    noise[..., 0] = 1e4  # forces chunk 0 into every selection that can hold it
    idx, w = hsa_retrieval_reference(q_r, lmk, chunk_size=S, topk=K, gumbel=True, noise=noise)
    assert (idx[0, 4:, 0] == 0).any(-1).all()
    picked = retrieval_scores(q_r, lmk).gather(-1, idx.long().clamp(min=0))
    assert torch.allclose(w, chunk_weights(picked, idx >= 0, "softmax"))  # noise-free scores


# ---------------------------------------------------------------- Triton (interpreter on CPU)

# (B, L, R, Dr, S, K, dtype, weight_rule, rank_decay)
CPU_CASES = [
    (2, 100, 2, 32, 8, 3, torch.float32, "softmax", None),
    (1, 150, 1, 48, 8, 7, torch.float32, "stick_breaking", 0.3),  # Dr not a power of 2, K not a power of 2
    (1, 130, 2, 16, 4, 20, torch.float16, "softmax", 0.1),  # many chunks (33), K=20, fp16
    (1, 70, 1, 16, 32, 1, torch.float32, "softmax", None),  # K=1, S=32
]


@pytest.mark.parametrize("B,L,R,Dr,S,K,dtype,weight_rule,rank_decay", CPU_CASES)
def test_triton_retrieval_matches_reference(B, L, R, Dr, S, K, dtype, weight_rule, rank_decay):
    q_r, lmk = inputs(B, L, R, Dr, S, dtype, seed=L)
    decay = None if rank_decay is None else torch.tensor(rank_decay, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        q = q_r.float().detach().requires_grad_() if backend == "reference" else q_r.detach().requires_grad_()
        l = lmk.float().detach().requires_grad_() if backend == "reference" else lmk.detach().requires_grad_()
        p = None if decay is None else decay.clone().requires_grad_()
        idx, w = hsa_retrieval(q, l, chunk_size=S, topk=K, weight_rule=weight_rule, rank_decay=p, backend=backend)
        cot = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)).to(w.device)
        grads = torch.autograd.grad((w * cot).sum(), [x for x in (q, l, p) if x is not None])
        results.append((idx, w, grads))
    (idx, w, grads), (idx_ref, w_ref, grads_ref) = results
    assert idx.dtype == torch.int32 and w.dtype == torch.float32
    assert_selection_valid(idx, L, S, K)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert rel_err(w, w_ref) < REL_TOL[dtype]
    for g, g_ref in zip(grads, grads_ref):
        assert rel_err(g, g_ref) < REL_TOL[dtype] * 10


def test_triton_retrieval_packed_documents_never_cross():
    S, K = 8, 4
    cu = torch.tensor([0, 32, 48, 104, 123], device=DEVICE)
    q_r, lmk = inputs(1, 123, 2, 16, S, torch.float32, seed=4)
    idx, w = hsa_retrieval(q_r, lmk, chunk_size=S, topk=K, cu_seqlens=cu, backend="triton")
    idx_ref, w_ref = hsa_retrieval_reference(q_r, lmk, chunk_size=S, topk=K, cu_seqlens=cu)
    lo = torch.tensor([0] * 32 + [4] * 16 + [6] * 56 + [13] * 19)
    assert_selection_valid(idx, 123, S, K, lo=lo)
    assert torch.equal(idx.cpu(), idx_ref.cpu()) and rel_err(w, w_ref) < 1e-5
    with pytest.raises(ValueError, match="batch size 1"):
        hsa_retrieval(q_r.expand(2, -1, -1, -1), lmk.expand(2, -1, -1, -1), chunk_size=S, topk=K, cu_seqlens=cu)


def test_triton_retrieval_gumbel_is_seeded_valid_and_weighs_clean_scores():
    B, L, R, Dr, S, K = 1, 120, 1, 16, 4, 4
    q_r, lmk = inputs(B, L, R, Dr, S, torch.float32, seed=9)
    kw = dict(chunk_size=S, topk=K, gumbel=True, backend="triton")
    idx1, w1 = hsa_retrieval(q_r, lmk, seed=1, **kw)
    idx1b, _ = hsa_retrieval(q_r, lmk, seed=1, **kw)
    idx2, _ = hsa_retrieval(q_r, lmk, seed=2, **kw)
    idx_plain, _ = hsa_retrieval(q_r, lmk, chunk_size=S, topk=K, backend="triton")
    assert torch.equal(idx1, idx1b)
    assert not torch.equal(idx1, idx2) and not torch.equal(idx1, idx_plain)
    assert_selection_valid(idx1, L, S, K)
    picked = retrieval_scores(q_r, lmk).gather(-1, idx1.long().clamp(min=0))
    assert rel_err(w1, chunk_weights(picked, idx1 >= 0, "softmax")) < 1e-5


def test_retrieval_bad_inputs():
    q_r, lmk = inputs(1, 32, 2, 8, 8, torch.float32)
    with pytest.raises(ValueError, match="agree in batch, heads and head dim"):
        hsa_retrieval(q_r, lmk[..., :4], chunk_size=8, topk=2)
    with pytest.raises(ValueError, match="weight_rule"):
        hsa_retrieval(q_r, lmk, chunk_size=8, topk=2, weight_rule="sparsemax")


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "B,L,R,Dr,S,K", [(1, 8192, 4, 128, 64, 16), (2, 5000, 1, 64, 32, 64), (1, 4096, 8, 32, 128, 8)]
)
def test_triton_retrieval_gpu(B, L, R, Dr, S, K, dtype):
    q_r, lmk = inputs(B, L, R, Dr, S, dtype, seed=L)
    idx, w = hsa_retrieval(q_r, lmk, chunk_size=S, topk=K, backend="triton")
    assert_selection_valid(idx, L, S, K)
    # Compare to the reference on the same rounded inputs; near-ties may swap a few picks, so compare the score
    # mass selected and the weights where the selections agree.
    idx_ref, w_ref = hsa_retrieval_reference(q_r.float(), lmk.float(), chunk_size=S, topk=K)
    same = (idx == idx_ref).all(-1)
    assert same.float().mean() > 0.99
    assert rel_err(w[same], w_ref[same]) < 1e-4
    scores = retrieval_scores(q_r.float(), lmk.float())
    got = scores.gather(-1, idx.long().clamp(min=0)).masked_fill(idx < 0, 0).sum(-1)
    want = scores.gather(-1, idx_ref.long().clamp(min=0)).masked_fill(idx_ref < 0, 0).sum(-1)
    assert (got - want).abs().max() < 1e-2
