"""HSA sparse chunk attention: the reference against a per-token loop, the Triton kernels against the reference.

CPU runs the kernels in the Triton interpreter on tiny shapes (fp32, fp16); bf16 and large shapes are GPU tests.
"""

import math

import pytest
import torch

from megatron_ext.kernels.hsa import hsa_attention, hsa_attention_reference, hsa_decode, hsa_decode_reference
from megatron_ext.kernels.hsa.attention import build_reverse_index
from tests.kernels.common import DEVICE, rel_err

REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def random_causal_selection(B, L, Hk, K, S, num_chunks, generator, invalid_frac=0.0):
    """Distinct eligible chunks per (token, head), most recent first, -1 padding; fp32 weights summing to <= 1."""
    idx = torch.full((B, L, Hk, K), -1, dtype=torch.int32)
    for t in range(L):
        n_elig = min(t // S, num_chunks)
        if n_elig == 0:
            continue
        for b in range(B):
            for h in range(Hk):
                n = min(K, n_elig)
                if invalid_frac and n > 1 and torch.rand(1, generator=generator).item() < invalid_frac:
                    n -= 1
                pick = torch.randperm(n_elig, generator=generator)[:n].sort(descending=True).values
                idx[b, t, h, :n] = pick.int()
    logits = torch.randn(B, L, Hk, K, generator=generator)
    w = torch.softmax(logits.masked_fill(idx < 0, -math.inf), -1).nan_to_num(0.0)
    return idx, w


def make_inputs(B, L, Hq, Hk, D, S, K, dtype, seed=0, invalid_frac=0.0, extra_chunks=0):
    gen = torch.Generator().manual_seed(seed)
    C = L // S + extra_chunks
    idx, w = random_causal_selection(B, L, Hk, K, S, C, gen, invalid_frac)
    q = torch.randn(B, L, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, C * S, Hk, D, generator=gen).to(dtype)
    v = torch.randn(B, C * S, Hk, D, generator=gen).to(dtype)
    return [x.to(DEVICE) for x in (q, k, v, w, idx)]


def run_with_grads(fn, q, k, v, w, idx, do, **kw):
    q, k, v, w = (x.detach().clone().requires_grad_() for x in (q, k, v, w))
    o = fn(q, k, v, w, idx, **kw)
    grads = torch.autograd.grad(o, (q, k, v, w), do)
    return (o, *grads)


def check_against_reference(q, k, v, w, idx, *, S, dtype, schedule, off_by_one=False, sm_scale=None):
    kw = dict(chunk_size=S, softmax_off_by_one=off_by_one, sm_scale=sm_scale)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(q.device)
    got = run_with_grads(hsa_attention, q, k, v, w, idx, do, backend="triton", schedule=schedule, **kw)
    # fp32 oracle on the same (rounded) inputs
    want = run_with_grads(hsa_attention_reference, q.float(), k.float(), v.float(), w, idx, do.float(), **kw)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, want):
        assert a.dtype == (b.dtype if name == "dw" else dtype)
        err = rel_err(a, b)
        assert err < REL_TOL[dtype], f"{name}: relative error {err:.2e} >= {REL_TOL[dtype]:.0e}"


# ---------------------------------------------------------------- reference


def test_reference_matches_per_token_loop():
    """The vectorised reference equals a literal loop over tokens, heads and slots (off-by-one softmax on)."""
    B, L, Hq, Hk, D, S, K = 2, 40, 4, 2, 8, 8, 3
    q, k, v, w, idx = (x.cpu() for x in make_inputs(B, L, Hq, Hk, D, S, K, torch.float32, invalid_frac=0.3))
    o = hsa_attention_reference(q, k, v, w, idx, chunk_size=S, softmax_off_by_one=True)
    G = Hq // Hk
    expect = torch.zeros_like(o)
    for b in range(B):
        for t in range(L):
            for hq in range(Hq):
                h = hq // G
                for slot in range(K):
                    c = int(idx[b, t, h, slot])
                    if c < 0:
                        continue
                    logits = k[b, c * S:(c + 1) * S, h] @ q[b, t, hq] / math.sqrt(D)
                    p = torch.exp(logits) / (1.0 + torch.exp(logits).sum())
                    expect[b, t, hq] += w[b, t, h, slot] * (p @ v[b, c * S:(c + 1) * S, h])
    assert rel_err(o, expect) < 1e-6


def test_reference_skips_invalid_slots_whatever_their_weight():
    q, k, v, w, idx = (x.cpu() for x in make_inputs(1, 64, 2, 1, 8, 16, 4, torch.float32))
    w_noisy = torch.where(idx < 0, torch.full_like(w, 5.0), w)
    a = hsa_attention_reference(q, k, v, w, idx, chunk_size=16)
    b = hsa_attention_reference(q, k, v, w_noisy, idx, chunk_size=16)
    assert torch.equal(a, b)
    assert (a[0, :16] == 0).all()  # the first chunk's tokens have nothing to attend to


def test_reverse_index_lists_exactly_the_selecting_pairs():
    B, L, Hk, K, S = 2, 50, 2, 3, 8
    idx, _ = random_causal_selection(B, L, Hk, K, S, L // S, torch.Generator().manual_seed(1), invalid_frac=0.3)
    C = L // S
    pairs, offsets, token_range = build_reverse_index(idx, C)
    assert token_range == 0
    for b in range(B):
        for h in range(Hk):
            for c in range(C):
                i = (b * Hk + h) * C + c
                got = pairs[offsets[i]:offsets[i + 1]].tolist()
                want = [t * K + s for t in range(L) for s in range(K) if idx[b, t, h, s] == c]
                assert got == want


def with_out_of_range_slots(idx, w, num_chunks):
    """(indices with batch row 0's empty slots pointing past the memory, the same slots marked -1, weights of 0.5 in
    those slots): index C would alias the next (batch, KV head)'s chunk 0 in a flat layout, C + 1000 lies far out."""
    oob = idx < 0
    oob[1:] = False
    far = torch.arange(idx.shape[1], device=idx.device)[None, :, None, None] % 2 == 1
    idx_oob = torch.where(oob, torch.where(far, num_chunks + 1000, num_chunks), idx).to(idx.dtype)
    return idx_oob, torch.where(oob, -1, idx_oob).to(idx.dtype), torch.where(oob, 0.5, w)


def test_reference_skips_indices_past_the_memory():
    """Indices >= C are skipped like -1: same output and gradients, whatever their weight (weight gradient 0)."""
    q, k, v, w, idx = (x.cpu() for x in make_inputs(2, 48, 2, 1, 8, 16, 2, torch.float32))
    idx_oob, idx_neg, w = with_out_of_range_slots(idx, w, k.shape[1] // 16)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    got = run_with_grads(hsa_attention_reference, q, k, v, w, idx_oob, do, chunk_size=16)
    want = run_with_grads(hsa_attention_reference, q, k, v, w, idx_neg, do, chunk_size=16)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert (got[-1][idx_neg < 0] == 0).all()


def test_reference_with_an_empty_memory_gives_zeros():
    """No chunk yet (C = 0, e.g. fewer tokens than a chunk): zero output and zero gradients, not an IndexError."""
    q, k, v, w, idx = (x.cpu() for x in make_inputs(2, 12, 2, 1, 8, 16, 2, torch.float32))
    assert k.shape[1] == 0 and (idx < 0).all()
    o, dq, dk, dv, dw = run_with_grads(hsa_attention_reference, q, k, v, w, idx, torch.ones_like(q), chunk_size=16)
    assert (o == 0).all() and (dq == 0).all() and (dw == 0).all()
    assert dk.shape == k.shape and dv.shape == v.shape


def test_bad_inputs_raise_clear_errors():
    q, k, v, w, idx = make_inputs(1, 32, 4, 2, 8, 8, 2, torch.float32)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        hsa_attention(q, k[:, :-1], v[:, :-1], w, idx, chunk_size=8)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        hsa_attention(q[:, :, :3], k, v, w, idx, chunk_size=8)
    with pytest.raises(ValueError, match="expand a single retrieval head"):
        hsa_attention(q, k, v, w[:, :, :1], idx[:, :, :1], chunk_size=8)
    with pytest.raises(ValueError, match="schedule"):
        hsa_attention(q, k, v, w, idx, chunk_size=8, schedule="sideways")


# ---------------------------------------------------------------- Triton (interpreter on CPU)

# (B, L, Hq, Hk, D, S, K, dtype, schedule, off_by_one)
CPU_CASES = [
    (2, 70, 4, 2, 32, 32, 1, torch.float32, "chunk", False),  # G=2, K=1, batch 2, L not a multiple of S
    (1, 100, 3, 1, 64, 32, 3, torch.float16, "chunk", True),  # G=3 (not a power of 2), fp16
    (1, 90, 16, 1, 32, 32, 2, torch.float32, "auto", True),  # G=16: token forward, chunk backward
    (1, 96, 1, 1, 128, 32, 2, torch.float16, "token", False),  # G=1 padded rows, D=128
    (1, 100, 64, 1, 32, 64, 2, torch.float32, "chunk", False),  # G=64 in the chunk schedule, S=64
    (1, 130, 8, 1, 32, 128, 3, torch.float32, "token", False),  # S=128 (mostly invalid slots)
    (1, 80, 2, 1, 32, 16, 17, torch.float32, "chunk", False),  # K=17 > available chunks: invalid slots skipped
]


@pytest.mark.parametrize("B,L,Hq,Hk,D,S,K,dtype,schedule,off_by_one", CPU_CASES)
def test_triton_matches_reference(B, L, Hq, Hk, D, S, K, dtype, schedule, off_by_one):
    q, k, v, w, idx = make_inputs(B, L, Hq, Hk, D, S, K, dtype, seed=L + Hq, invalid_frac=0.2, extra_chunks=1)
    check_against_reference(q, k, v, w, idx, S=S, dtype=dtype, schedule=schedule, off_by_one=off_by_one)


@pytest.mark.parametrize(
    "schedule,G,dtype,dq_acc",
    [("chunk", 2, torch.float32, "fp32"), ("token", 2, torch.float32, "fp32"), ("chunk", 3, torch.float16, "fp16"),
     ("chunk", 16, torch.float16, "fp16")],
)
def test_backward_split_into_token_ranges(monkeypatch, schedule, G, dtype, dq_acc):
    """The chunk backward split into token ranges (atomic fp32 dK/dV, and dq without the per-slot buffer, added into
    an fp32 or a scaled fp16 accumulator) gives the same gradients."""
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "bwd_token_range", 32)
    monkeypatch.setitem(attention.TUNING, "bwd_dq_acc", dq_acc)
    q, k, v, w, idx = make_inputs(1, 100, 2 * G, 2, 32, 16, 3, dtype, seed=21 + G, invalid_frac=0.2)
    check_against_reference(q, k, v, w, idx, S=16, dtype=dtype, schedule=schedule)


@pytest.mark.parametrize(
    "B,G,off_by_one,dtype,acc",
    [(1, 2, False, torch.float32, "fp32"), (1, 16, True, torch.float16, "fp32"), (1, 2, True, torch.float16, "fp16"),
     (1, 16, False, torch.float16, "fp16"), (2, 3, False, torch.float16, "fp16")],
)
def test_forward_by_token_ranges_with_atomics(monkeypatch, B, G, off_by_one, dtype, acc):
    """The chunk forward by token ranges (atomic fp32 or scaled fp16 accumulator, no per-slot buffer) gives the
    reference's output, log-sum-exp (through the backward) and gradients; 100 tokens in ranges of 32 leave a partial
    last range."""
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "fwd_token_range", 32)
    monkeypatch.setitem(attention.TUNING, "fwd_atomic_acc", acc)
    q, k, v, w, idx = make_inputs(B, 100, 2 * G, 2, 32, 16, 3, dtype, seed=23 + G, invalid_frac=0.2)
    check_against_reference(q, k, v, w, idx, S=16, dtype=dtype, schedule="chunk", off_by_one=off_by_one)


@pytest.mark.parametrize("v_scale,do_scale", [(1e6, 1e4), (1e-7, 1e-6)])
def test_fp16_accumulators_keep_every_magnitude(monkeypatch, v_scale, do_scale):
    """fp16 accumulators hold their sums scaled by a power of two from a bound on the partial sums: values that
    would overflow fp16 (|O| ~ 1e6, |dq| ~ 1e11) or sink below its normals (|O| ~ 1e-7) keep fp16's relative
    precision. fp32 inputs against the fp32 reference, so only the accumulators round."""
    from megatron_ext.kernels.hsa import attention

    for key, value in (("fwd_token_range", 32), ("bwd_token_range", 32), ("fwd_atomic_acc", "fp16"),
                       ("bwd_dq_acc", "fp16")):
        monkeypatch.setitem(attention.TUNING, key, value)
    q, k, v, w, idx = make_inputs(1, 100, 16, 1, 32, 16, 3, torch.float32, seed=31, invalid_frac=0.2)
    v = v * v_scale
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) * do_scale
    got = run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=16, schedule="chunk")
    want = run_with_grads(hsa_attention_reference, q, k, v, w, idx, do, chunk_size=16)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 2e-3, f"{name}: relative error {rel_err(a, b):.2e}"


def test_fp16_accumulator_scale_is_the_largest_safe_power_of_two():
    from megatron_ext.kernels.hsa import attention

    for bound in (1e11, 3.0, 2.0**-20, 1e-30):
        scale = attention._fp16_accumulator_scale(torch.tensor(bound)).item()
        assert math.log2(scale) == round(math.log2(scale))
        assert scale * bound <= 2.0**15 < 2 * scale * bound
    assert attention._fp16_accumulator_scale(torch.tensor(0.0)).item() == 2.0**115  # any finite scale would do
    # the bounds hold: every partial sum of the forward and of dq stays within them
    q, k, v, w, idx = make_inputs(1, 64, 4, 1, 32, 16, 3, torch.float32, seed=8)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    o_k = hsa_attention_reference(q, k, v, w, idx, chunk_size=16)
    assert o_k.abs().max() <= attention._output_bound(v, w)
    dq = torch.autograd.grad(
        hsa_attention_reference(q.requires_grad_(), k, v, w, idx, chunk_size=16), q, do
    )[0]
    assert dq.abs().max() <= attention._dq_bound(k, v, w, do, q.shape[-1] ** -0.5)


def test_auto_token_ranges_follow_the_measured_rule(monkeypatch):
    """"auto" runs both passes by token ranges into fp16 accumulators for bf16 on a GPU (q of >= 2**24 elements;
    the forward when one KV head's K holds >= 2**20 elements and K >= 16, the backward also needs G >= 16): L/16
    rounded down to a power of two, from 1024 up to 32 MiB of q and accumulator rows per KV head, the backward into
    at most 16 ranges; never for other dtypes, nor in deterministic mode. The rule is asserted on shapes (no GPU
    needed)."""
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setattr(attention, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(attention, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")

    def ranges(L, G, D, K, dtype=torch.bfloat16, kv_len=None, programs=10**6, kv_heads=4):
        shape = attention.PassShape(L, kv_len or L, G, D, K, L * G * kv_heads * D, dtype, cuda)
        fwd = attention._fwd_token_range(shape)
        assert (attention.auto_schedules(G, 64, D, True, shape)[0] == "chunk") == (fwd > 0 or G < 16)
        return fwd, attention._bwd_token_range(shape, programs)

    assert ranges(65536, 16, 128, 16) == (4096, 4096)  # config A
    # capped at 4096 tokens x 16 heads x 128 x 4 bytes = 32 MiB; the backward takes at most 16 ranges
    assert ranges(131072, 16, 128, 16) == (4096, 0)
    assert ranges(131072, 16, 64, 32, kv_heads=1) == (8192, 8192)
    assert ranges(16384, 16, 128, 16) == (1024, 1024)
    assert ranges(65536, 16, 64, 32, kv_heads=1) == (4096, 4096)  # the 345M model's layer
    # K holds 2**19 elements: the token forward, and the backward by 1024-token ranges since its chunk programs are
    # few (with an fp32 dq: q has 2**23 elements, fewer than FP16_ACCUMULATOR_MIN_ELEMENTS)
    assert ranges(8192, 16, 64, 32, programs=128, kv_heads=1) == (0, 1024)
    assert ranges(65536, 1, 64, 16, kv_heads=1) == (0, 0)  # 2**22 elements: fp32 accumulators, no ranges
    assert ranges(65536, 16, 64, 8, kv_heads=1) == (0, 0)  # config B: top-8, token forward, unsplit backward
    assert ranges(65536, 2, 128, 16) == (4096, 0)  # config C: G < 16
    assert ranges(262144, 2, 128, 16) == (16384, 0)
    assert ranges(65536, 16, 128, 16, dtype=torch.float16) == (0, 0)  # fp32 accumulators: no ranges by default
    assert ranges(1024, 16, 128, 16, kv_len=2**20) == (0, 0)  # a single range
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert ranges(65536, 16, 128, 16) == (0, 0)
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.setitem(attention.TUNING, "fwd_token_range", "some")
    with pytest.raises(ValueError, match="fwd_token_range"):
        ranges(65536, 16, 128, 16)


def test_deterministic_mode_never_adds_with_atomics(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) (Megatron's --deterministic-mode) the token-range modes, whose
    fp32 atomics add in no fixed order, fall back to the per-slot buffers: bitwise-repeatable results."""
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "fwd_token_range", 32)
    monkeypatch.setitem(attention.TUNING, "bwd_token_range", 32)
    ranges = []
    build = attention.build_reverse_index
    monkeypatch.setattr(attention, "build_reverse_index", lambda i, c, r=0: ranges.append(r) or build(i, c, r))
    q, k, v, w, idx = make_inputs(1, 100, 4, 2, 32, 16, 3, torch.float32, seed=9, invalid_frac=0.2)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=16, schedule="chunk")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert ranges == [0]  # one index, unsplit, built by the forward and reused by the backward
    ranges.clear()
    run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=16, schedule="chunk")
    assert ranges == [32]  # otherwise both passes split into token ranges, the backward on the forward's index


def test_reverse_index_split_by_token_range():
    """Token ranges split each chunk's pairs (token order) into consecutive runs: range r of chunk c is segment
    (h*C + c)*NR + r, and a chunk's segments together are its unsplit pairs."""
    B, L, Hk, K, S, R = 1, 50, 2, 3, 8, 16
    idx, _ = random_causal_selection(B, L, Hk, K, S, L // S, torch.Generator().manual_seed(2), invalid_frac=0.3)
    C, NR = L // S, -(-L // R)
    pairs, offsets, token_range = build_reverse_index(idx, C, token_range=R)
    unsplit = build_reverse_index(idx, C)
    assert token_range == R and offsets.numel() == Hk * C * NR + 1
    assert torch.equal(pairs[:offsets[-1]], unsplit.pairs[:unsplit.offsets[-1]])
    for h in range(Hk):
        for c in range(C):
            for r in range(NR):
                i = (h * C + c) * NR + r
                want = [t * K + s for t in range(r * R, min(L, (r + 1) * R)) for s in range(K) if idx[0, t, h, s] == c]
                assert pairs[offsets[i]:offsets[i + 1]].tolist() == want
            assert offsets[(h * C + c) * NR] == unsplit.offsets[h * C + c]
    assert build_reverse_index(idx, C, token_range=L).token_range == 0  # one range: unsplit


def test_backward_by_kv_head_groups_is_bitwise_the_single_launch(monkeypatch):
    """The chunk backward launched KV-head group by group (slot sums on a side stream on GPUs) computes exactly what
    one launch over all heads computes: same programs, same order inside each."""
    from megatron_ext.kernels.hsa import attention

    q, k, v, w, idx = make_inputs(2, 60, 48, 3, 32, 16, 3, torch.float32, seed=31, invalid_frac=0.2)  # G = 16
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device)
    monkeypatch.setitem(attention.TUNING, "bwd_dq", "dq")  # the per-slot dq rows are what runs in groups
    grads = []
    for groups in (1, 3):
        monkeypatch.setitem(attention.TUNING, "bwd_head_groups", groups)
        grads.append(run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=16, schedule="chunk"))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "Hq,Hk,D,S,dtype", [(32, 2, 32, 16, torch.float32), (4, 2, 64, 32, torch.float16), (16, 1, 16, 16, torch.float32)]
)
def test_backward_dq_from_ds_rows_or_dq_rows(monkeypatch, Hq, Hk, D, S, dtype):
    """dq from per-slot dS rows times the gathered K (token kernel) and from per-slot dq rows (slot sum) both give
    the reference's gradients, for G >= 16 and small groups, S < D and S = D; "auto" picks dS rows exactly when
    G >= 16 and S < D."""
    from megatron_ext.kernels.hsa import attention

    q, k, v, w, idx = make_inputs(2, 90, Hq, Hk, D, S, 3, dtype, seed=Hq + D, invalid_frac=0.2)
    for mode in ("ds", "dq"):
        monkeypatch.setitem(attention.TUNING, "bwd_dq", mode)
        check_against_reference(q, k, v, w, idx, S=S, dtype=dtype, schedule="chunk", off_by_one=mode == "ds")
    monkeypatch.setitem(attention.TUNING, "bwd_dq", "auto")
    assert attention._bwd_dq_rows(Hq // Hk, S, D) == ("ds" if Hq // Hk >= 16 and S < D else "dq")
    monkeypatch.setitem(attention.TUNING, "bwd_dq", "dS")
    with pytest.raises(ValueError, match="bwd_dq"):
        attention._bwd_dq_rows(Hq // Hk, S, D)


def record_forward_schedules(monkeypatch) -> list:
    """The forward schedule of every hsa_attention_forward call from now on."""
    from megatron_ext.kernels.hsa import attention

    schedules = []
    forward = attention.hsa_attention_forward
    monkeypatch.setattr(
        attention, "hsa_attention_forward", lambda *a, **kw: schedules.append(a[8]) or forward(*a, **kw)
    )
    return schedules


@pytest.mark.parametrize(
    "B,L,Hq,Hk,D,S,dtype,off_by_one",
    [(2, 90, 32, 2, 32, 16, torch.float32, True), (1, 100, 16, 1, 64, 32, torch.float16, False),
     (1, 70, 64, 1, 32, 16, torch.float32, False)],
)
def test_forward_by_p_rows(monkeypatch, B, L, Hq, Hk, D, S, dtype, off_by_one):
    """The P-row forward (a chunk kernel by token ranges writes w_k P_k, the token kernel sums P_k V_k over the
    gathered V) gives the reference's output and, through the backward reusing its index by token ranges, its
    gradients; 32-token ranges leave a partial last range."""
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "fwd_p_rows", True)
    monkeypatch.setitem(attention.TUNING, "fwd_p_rows_range", 32)
    schedules = record_forward_schedules(monkeypatch)
    q, k, v, w, idx = make_inputs(B, L, Hq, Hk, D, S, 3, dtype, seed=L + D, invalid_frac=0.2, extra_chunks=1)
    check_against_reference(q, k, v, w, idx, S=S, dtype=dtype, schedule="auto", off_by_one=off_by_one)
    assert schedules == ["rows"]


def test_p_row_forward_only_when_a_backward_follows(monkeypatch):
    """"auto" takes the P-row forward (its buffer is the size of the backward's dS rows) only when a backward follows,
    for G >= 16 and S < D; otherwise the token forward (no buffer) or, for G < 16, the chunk forward."""
    from megatron_ext.kernels.hsa import attention

    assert attention.auto_schedules(16, 64, 128, True) == ("rows", "chunk")
    assert attention.auto_schedules(16, 64, 128, False) == ("token", "chunk")
    assert attention.auto_schedules(16, 64, 64, True) == ("token", "chunk")  # S = D: P rows measured slower
    assert attention.auto_schedules(8, 64, 128, True) == ("chunk", "chunk")
    monkeypatch.setitem(attention.TUNING, "fwd_p_rows", False)
    assert attention.auto_schedules(16, 64, 128, True) == ("token", "chunk")
    monkeypatch.setitem(attention.TUNING, "fwd_p_rows", "yes")
    with pytest.raises(ValueError, match="fwd_p_rows"):
        attention.auto_schedules(16, 64, 128, True)
    monkeypatch.setitem(attention.TUNING, "fwd_p_rows", "auto")
    q, k, v, w, idx = make_inputs(1, 64, 16, 1, 32, 16, 2, torch.float32, seed=6)
    schedules = record_forward_schedules(monkeypatch)
    with torch.no_grad():
        hsa_attention(*(x.detach().requires_grad_() for x in (q, k, v, w)), idx, chunk_size=16)
    hsa_attention(*(x.detach().requires_grad_() for x in (q, k, v, w)), idx, chunk_size=16)
    assert schedules == ["token", "rows"]


def test_token_forward_builds_the_backward_index_only_for_a_backward(monkeypatch):
    """With gradients to come, the token forward builds the reverse index (on GPUs beside its kernel) and the
    backward reuses it; without, no index is built."""
    from megatron_ext.kernels.hsa import attention

    calls = []
    build = attention.build_reverse_index
    monkeypatch.setattr(attention, "build_reverse_index", lambda i, c, r=0: calls.append(r) or build(i, c, r))
    monkeypatch.setitem(attention.TUNING, "fwd_p_rows", False)  # the plain token forward (S < D would take P rows)
    q, k, v, w, idx = make_inputs(1, 80, 16, 1, 32, 16, 3, torch.float32, seed=4, invalid_frac=0.2)
    with torch.no_grad():  # inputs that require grad, but no graph: no backward can follow
        hsa_attention(*(x.detach().requires_grad_() for x in (q, k, v, w)), idx, chunk_size=16, schedule="auto")
    hsa_attention(q, k, v, w, idx, chunk_size=16, schedule="auto")  # nothing requires grad
    assert calls == []
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    got = run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=16, schedule="auto")
    assert calls == [0]
    want = run_with_grads(hsa_attention_reference, q, k, v, w, idx, do, chunk_size=16)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5


def test_token_forward_tma_loads_match_pointer_loads(monkeypatch):
    """K/V chunks loaded as TMA boxes (invalid slots read past the end: zeros) give exactly the per-thread loads'
    output, with a batch of 2 and more chunks than the tokens reach."""
    from megatron_ext.kernels.hsa import attention

    descriptors = []
    make_descriptor = attention._rows_descriptor
    monkeypatch.setattr(attention, "_rows_descriptor", lambda *a: descriptors.append(a) or make_descriptor(*a))
    q, k, v, w, idx = make_inputs(2, 100, 8, 2, 32, 16, 3, torch.float32, seed=3, invalid_frac=0.3, extra_chunks=1)
    outs = []
    for tma in (True, False):
        monkeypatch.setitem(attention.TUNING, "token_fwd_tma", tma)
        outs.append(hsa_attention(q, k, v, w, idx, chunk_size=16, schedule="token"))
    assert len(descriptors) == 2  # K and V, by the TMA run only
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[0], hsa_attention_reference(q, k, v, w, idx, chunk_size=16)) < 1e-5
    # K/V that do not start on 16 bytes (a contiguous view at an odd offset) cannot be TMA boxes: per-thread loads
    monkeypatch.setitem(attention.TUNING, "token_fwd_tma", True)
    k_odd = torch.empty(k.numel() + 1, dtype=k.dtype, device=k.device)[1:].view(k.shape).copy_(k)
    assert k_odd.is_contiguous() and k_odd.data_ptr() % 16
    assert torch.equal(hsa_attention(q, k_odd, v, w, idx, chunk_size=16, schedule="token"), outs[1])
    assert len(descriptors) == 2


def test_both_schedules_agree_with_custom_scale():
    q, k, v, w, idx = make_inputs(1, 80, 8, 2, 32, 16, 3, torch.float32, seed=3)
    outs = [hsa_attention(q, k, v, w, idx, chunk_size=16, sm_scale=0.3, schedule=s) for s in ("token", "chunk")]
    assert rel_err(outs[0], outs[1]) < 1e-5
    assert rel_err(outs[0], hsa_attention_reference(q, k, v, w, idx, chunk_size=16, sm_scale=0.3)) < 1e-5


@pytest.mark.parametrize("Hq,schedule", [(2, "token"), (2, "chunk"), (16, "rows")])
def test_indices_past_the_memory_are_skipped(monkeypatch, Hq, schedule):
    """Every schedule treats an index >= C as an empty slot: the output and all gradients equal those with -1 in
    that slot (dw 0), the reference's too. Index C used to read the next sample's rows in the token kernels and, in
    the reverse index, alias the next sample's chunk 0, corrupting its dK/dV."""
    from megatron_ext.kernels.hsa import attention

    if schedule == "rows":  # P-row forward, then the chunk backward with dS rows (G >= 16, S < D)
        monkeypatch.setitem(attention.TUNING, "fwd_p_rows", True)
        schedule = "auto"
    q, k, v, w, idx = make_inputs(2, 48, Hq, 1, 32, 16, 2, torch.float32, seed=Hq)
    idx_oob, idx_neg, w = with_out_of_range_slots(idx, w, k.shape[1] // 16)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.device)
    got = run_with_grads(hsa_attention, q, k, v, w, idx_oob, do, chunk_size=16, backend="triton", schedule=schedule)
    same = run_with_grads(hsa_attention, q, k, v, w, idx_neg, do, chunk_size=16, backend="triton", schedule=schedule)
    want = run_with_grads(hsa_attention_reference, q, k, v, w, idx_neg, do, chunk_size=16)
    for name, a, b, c in zip(("o", "dq", "dk", "dv", "dw"), got, same, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        assert rel_err(a, c) < 1e-5, name
    assert (got[-1][idx_neg < 0] == 0).all()


@pytest.mark.parametrize("D,schedule", [(16, "token"), (32, "chunk"), (16, "auto")])
def test_empty_memory_gives_zeros(D, schedule):
    """C = 0 (fewer tokens than a chunk): zero output and gradients on every schedule, with TMA loads on (D = 16
    and 32 are TMA widths, whose descriptor cannot cover an empty tensor)."""
    q, k, v, w, idx = make_inputs(2, 12, 16, 1, D, 16, 2, torch.float32)
    assert k.shape[1] == 0
    do = torch.ones_like(q)
    got = run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=16, backend="triton", schedule=schedule)
    for name, g in zip(("o", "dq", "dk", "dv", "dw"), got):
        assert torch.equal(g, torch.zeros_like(g)), name


def test_decode_before_the_first_chunk_is_complete():
    """Decode with an empty cache (no complete chunk yet) gives zeros and empty selections on both backends."""
    B, Hq, Hk, D, S, K, Dr = 2, 4, 2, 16, 16, 2, 16
    q, q_r = torch.randn(B, Hq, D).to(DEVICE), torch.randn(B, 1, Dr).to(DEVICE)
    k = v = torch.zeros(B, 0, Hk, D).to(DEVICE)
    lmk = torch.zeros(B, 0, 1, Dr).to(DEVICE)
    pos = torch.tensor([3, 15], device=DEVICE)
    for backend in ("triton", "reference"):
        o, idx, w = hsa_decode(q, q_r, k, v, lmk, pos, chunk_size=S, topk=K, backend=backend)
        assert (o == 0).all() and (idx == -1).all() and (w == 0).all(), backend


def test_chunk_sizes_that_are_not_a_power_of_two_run_on_the_reference_or_are_refused():
    """A chunk is one Triton tile, so 24 or 48 tokens cannot be: "auto" gives the reference's output (training and
    decode), "triton" is a clear error naming the sizes the kernels take."""
    S = 24
    q, k, v, w, idx = make_inputs(1, 72, 2, 1, 16, S, 2, torch.float32, seed=4)
    torch.testing.assert_close(hsa_attention(q, k, v, w, idx, chunk_size=S),
                               hsa_attention_reference(q, k, v, w, idx, chunk_size=S))
    with pytest.raises(ValueError, match="power-of-two chunk_size .16, 32, 64"):
        hsa_attention(q, k, v, w, idx, chunk_size=S, backend="triton")
    lmk, q_r, pos = torch.randn(1, 3, 1, 8).to(DEVICE), torch.randn(1, 1, 8).to(DEVICE), torch.tensor([71]).to(DEVICE)
    args = (q[:, -1], q_r, k, v, lmk, pos)
    got = hsa_decode(*args, chunk_size=S, topk=2)
    for a, b in zip(got, hsa_decode_reference(*args, chunk_size=S, topk=2)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="power-of-two chunk_size"):
        hsa_decode(*args, chunk_size=S, topk=2, backend="triton")


@pytest.mark.parametrize("R", [1, 2])
def test_decode_matches_reference_and_full_attention(R):
    B, Hq, Hk, D, S, K, Dr = 2, 4, 2, 32, 16, 3, 16
    gen = torch.Generator().manual_seed(5)
    C = 6
    q = torch.randn(B, Hq, D, generator=gen).to(DEVICE)
    q_r = torch.randn(B, R, Dr, generator=gen).to(DEVICE)
    k = torch.randn(B, C * S, Hk, D, generator=gen).to(DEVICE)
    v = torch.randn(B, C * S, Hk, D, generator=gen).to(DEVICE)
    lmk = torch.randn(B, C, R, Dr, generator=gen).to(DEVICE)
    pos = torch.tensor([37, 95], device=DEVICE)  # 2 and 5 eligible chunks; the cache holds 6
    kw = dict(chunk_size=S, topk=K, weight_rule="stick_breaking", rank_decay=0.2, softmax_off_by_one=True)
    o, idx, w = hsa_decode(q, q_r, k, v, lmk, pos, backend="triton", **kw)
    o_ref, idx_ref, w_ref = hsa_decode_reference(q, q_r, k, v, lmk, pos, **kw)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert idx[0, :, 2].eq(-1).all() and idx[0, :, :2].ge(0).all() and idx[1].ge(0).all()
    assert rel_err(w, w_ref) < 1e-6
    assert rel_err(o, o_ref) < 1e-5
    # The decode step equals the training-time attention of the same token.
    o_full = hsa_attention_reference(q[:, None], k, v, w[:, None], idx[:, None], chunk_size=S, softmax_off_by_one=True)
    assert rel_err(o, o_full[:, 0]) < 1e-5


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_decode_rejects_inputs_that_do_not_fit_the_cache(backend):
    """Both backends check the decode inputs as the attention op does; the Triton path used to return garbage (or
    leave heads unwritten) for these."""
    B, Hq, Hk, D, S, C, Dr = 2, 4, 2, 16, 16, 2, 8
    q, q_r = torch.randn(B, Hq, D).to(DEVICE), torch.randn(B, 1, Dr).to(DEVICE)
    k = v = torch.randn(B, C * S, Hk, D).to(DEVICE)
    lmk, pos = torch.randn(B, C, 1, Dr).to(DEVICE), torch.tensor([20, 40], device=DEVICE)
    cases = [
        ("multiple of KV heads", (q[:, :3], q_r, k, v, lmk, pos)),
        ("D=32", (torch.randn(B, Hq, 32).to(DEVICE), q_r, k, v, lmk, pos)),
        ("B=1, C\\*S", (q[:1], q_r[:1], k, v, lmk, pos[:1])),  # q's batch differs from the cache's
        ("same batch size", (q, q_r[:1], k, v, lmk[:1], pos)),
        ("must agree in batch", (q, q_r, k, v, lmk[:1], pos)),
        ("only 2", (q, q_r, k, v, torch.randn(B, C + 1, 1, Dr).to(DEVICE), pos)),
        ("retrieval heads must be 1 or Hk", (q, q_r.expand(B, 3, Dr), k, v, lmk.expand(B, C, 3, Dr), pos)),
    ]
    for match, args in cases:
        with pytest.raises(ValueError, match=match):
            hsa_decode(*args, chunk_size=S, topk=2, backend=backend)
    with pytest.raises(TypeError, match="must share a dtype"):
        hsa_decode(q.half(), q_r, k, v, lmk, pos, chunk_size=S, topk=2, backend=backend)


# ---------------------------------------------------------------- GPU


GPU_CASES = [
    # (B, L, Hq, Hk, D, S, K, schedule)
    (1, 4096, 64, 4, 128, 64, 16, "token"),  # config A heads
    (2, 3000, 16, 1, 64, 64, 8, "token"),  # config B heads, batch 2, ragged length
    (1, 4096, 16, 8, 128, 64, 16, "chunk"),  # config C heads
    (1, 2500, 12, 4, 32, 32, 64, "chunk"),  # K=64, D=32, G=3
    (1, 2048, 8, 8, 64, 128, 4, "token"),  # G=1 in the token schedule, S=128
    (1, 2048, 64, 1, 64, 64, 8, "chunk"),  # G=64 in the chunk schedule
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,L,Hq,Hk,D,S,K,schedule", GPU_CASES)
def test_triton_matches_reference_gpu(B, L, Hq, Hk, D, S, K, schedule, dtype):
    q, k, v, w, idx = make_inputs(B, L, Hq, Hk, D, S, K, dtype, seed=L, invalid_frac=0.1)
    check_against_reference(q, k, v, w, idx, S=S, dtype=dtype, schedule=schedule, off_by_one=K % 2 == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("G", [1, 2, 3, 4, 5, 8, 16, 24, 32, 64])
def test_every_group_size_gpu(G):
    q, k, v, w, idx = make_inputs(1, 1024, G * 2, 2, 64, 64, 8, torch.bfloat16, seed=G)
    check_against_reference(q, k, v, w, idx, S=64, dtype=torch.bfloat16, schedule="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("acc", ["fp16", "fp32"])
@pytest.mark.parametrize("Hq,Hk,D", [(64, 4, 128), (16, 1, 64), (16, 8, 128)])
def test_forward_by_token_ranges_gpu(monkeypatch, Hq, Hk, D, acc):
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "fwd_token_range", 1024)
    monkeypatch.setitem(attention.TUNING, "fwd_atomic_acc", acc)
    q, k, v, w, idx = make_inputs(1, 4096, Hq, Hk, D, 64, 16, torch.bfloat16, seed=Hq + D)
    check_against_reference(q, k, v, w, idx, S=64, dtype=torch.bfloat16, schedule="chunk")


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hk,D,K", [(64, 4, 128, 16), (16, 1, 64, 32), (16, 8, 128, 16)])
def test_auto_atomic_passes_match_the_deterministic_ones_gpu(monkeypatch, Hq, Hk, D, K):
    """At 16K tokens "auto" runs bf16 by 1024-token ranges into fp16 accumulators (the backward too for G >= 16);
    its output and gradients match those of the deterministic per-slot buffers (a second schedule) within bf16
    rounding, V of magnitude 1e4 included (fp16 would overflow unscaled)."""
    from megatron_ext.kernels.hsa import attention

    q, k, v, w, idx = make_inputs(1, 16384, Hq, Hk, D, 64, K, torch.bfloat16, seed=Hq + K, invalid_frac=0.1)
    v = v * 1e4
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(q)
    built = []
    build = attention.build_reverse_index
    monkeypatch.setattr(attention, "build_reverse_index", lambda i, c, r=0: built.append(r) or build(i, c, r))
    got = run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=64)
    assert built == [1024]  # one index by token ranges, shared by both passes
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        want = run_with_grads(hsa_attention, q, k, v, w, idx, do, chunk_size=64)
    finally:
        torch.use_deterministic_algorithms(previous)
    for name, a, b in zip(("o", "dq", "dk", "dv", "dw"), got, want):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 1e-2, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.gpu
def test_chunks_below_16_tokens_on_gpu_run_on_the_reference_or_are_refused():
    """GPU dots contract over >= 16 elements: chunk size 8 runs on the reference under "auto" and is a clear error
    under "triton" (before this, Triton failed to compile inside a training step)."""
    from megatron_ext.kernels.hsa import hsa_attention
    from megatron_ext.kernels.hsa.reference import hsa_attention_reference

    q, k, v, w, idx = make_inputs(1, 64, 4, 1, 32, 8, 2, torch.float32, seed=5)
    q, k, v, w, idx = (t.cuda() for t in (q, k, v, w, idx))
    out = hsa_attention(q, k, v, w, idx, chunk_size=8)
    torch.testing.assert_close(out, hsa_attention_reference(q, k, v, w, idx, chunk_size=8))
    with pytest.raises(ValueError, match="chunk_size >= 16"):
        hsa_attention(q, k, v, w, idx, chunk_size=8, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["ds", "dq"])
def test_backward_dq_modes_gpu(monkeypatch, mode):
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "bwd_dq", mode)
    q, k, v, w, idx = make_inputs(1, 4096, 64, 4, 128, 64, 16, torch.bfloat16, seed=17, invalid_frac=0.1)
    check_against_reference(q, k, v, w, idx, S=64, dtype=torch.bfloat16, schedule="auto")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "Hq,Hk,D,dtype",
    [(64, 4, 128, torch.bfloat16), (16, 1, 64, torch.bfloat16), (64, 1, 64, torch.float16),
     (32, 2, 128, torch.float32)],
)
def test_forward_by_p_rows_gpu(monkeypatch, Hq, Hk, D, dtype):
    """The P-row forward on the GPU (forced on also where "auto" would not take it), batch 2, a partial last token
    range, the backward on its index."""
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "fwd_p_rows", True)
    q, k, v, w, idx = make_inputs(2, 2600, Hq, Hk, D, 64, 16, dtype, seed=Hq + D, invalid_frac=0.1)
    check_against_reference(q, k, v, w, idx, S=64, dtype=dtype, schedule="auto", off_by_one=True)


@pytest.mark.gpu
def test_fp32_gpu_is_exact():
    q, k, v, w, idx = make_inputs(1, 1024, 16, 2, 64, 64, 8, torch.float32, seed=11)
    for schedule in ("token", "chunk"):
        check_against_reference(q, k, v, w, idx, S=64, dtype=torch.float32, schedule=schedule)


@pytest.mark.gpu
@pytest.mark.parametrize("dq_acc", ["fp16", "fp32"])
@pytest.mark.parametrize("Hq,Hk,D", [(64, 4, 128), (16, 8, 128)])
def test_backward_split_into_token_ranges_gpu(monkeypatch, Hq, Hk, D, dq_acc):
    from megatron_ext.kernels.hsa import attention

    monkeypatch.setitem(attention.TUNING, "bwd_token_range", 1024)
    monkeypatch.setitem(attention.TUNING, "bwd_dq_acc", dq_acc)
    q, k, v, w, idx = make_inputs(1, 4096, Hq, Hk, D, 64, 16, torch.bfloat16, seed=Hq)
    check_against_reference(q, k, v, w, idx, S=64, dtype=torch.bfloat16, schedule="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("Hq,Hk,D", [(16, 1, 64), (16, 8, 64), (64, 4, 128)])  # token / chunk / P-row forward
def test_training_step_never_waits_for_the_gpu(Hq, Hk, D):
    """Forward and backward (reverse index included) queue their work without a host synchronisation, which would
    drain the launch queue in every HSA layer of a step. CUDA's sync debug mode turns any such wait into an error."""
    q, k, v, w, idx = make_inputs(2, 2048, Hq, Hk, D, 64, 8, torch.bfloat16, seed=7)
    q, k, v, w = (t.cuda().requires_grad_() for t in (q, k, v, w))
    idx = idx.cuda()

    def step():
        hsa_attention(q, k, v, w, idx, chunk_size=64).float().square().sum().backward()

    step()  # compiles and autotunes (which synchronises) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
