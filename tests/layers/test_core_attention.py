"""SDPA/band-mask core attention equals a naive float64 attention (causal, windowed, bidirectional, GQA), and the
megatron core-attention module keeps megatron's [s, b, h*d] contract."""

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from megatron_ext.layers.core_attention import LocalCoreAttention, attention, band_mask


def naive_attention(q, k, v, *, causal, window):
    """q [B, Hq, L, D], k/v [B, Hk, L, D] in float64, explicit loops over the mask definition."""
    B, Hq, L, D = q.shape
    G = Hq // k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for h in range(Hq):
        kh, vh = k[:, h // G].double(), v[:, h // G].double()
        for i in range(L):
            allowed = [j for j in range(L) if (not causal or j <= i) and (window is None or i - j <= window)]
            s = torch.einsum("bd,bnd->bn", q[:, h, i].double(), kh[:, allowed]) / math.sqrt(D)
            out[:, h, i] = torch.einsum("bn,bnd->bd", torch.softmax(s, -1), vh[:, allowed])
    return out


@pytest.mark.parametrize("causal, window", [(True, None), (True, 5), (False, None), (True, 40)])
def test_attention_matches_naive(causal, window):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 8, generator=gen)
    k = torch.randn(2, 2, 24, 8, generator=gen)
    v = torch.randn(2, 2, 24, 8, generator=gen)
    out = attention(q, k, v, causal=causal, window=window)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, causal=causal, window=window),
                               rtol=1e-5, atol=1e-5)


def test_band_mask_is_flash_attn_window_convention():
    mask = band_mask(5, 5, 2, True, "cpu")
    assert mask[4].tolist() == [False, False, True, True, True]  # i - j in {0, 1, 2}
    assert mask[0].tolist() == [True, False, False, False, False]


def test_core_attention_module_contract(megatron_world):
    from tests.models.tiny import tiny_config

    config = tiny_config("swa*2")
    module = LocalCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, window_size=3)
    gen = torch.Generator().manual_seed(1)
    s, b = 10, 2
    q = torch.randn(s, b, 4, 16, generator=gen)
    k = torch.randn(s, b, 2, 16, generator=gen)
    v = torch.randn(s, b, 2, 16, generator=gen)
    out = module(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=None)
    assert out.shape == (s, b, 4 * 16)
    ref = naive_attention(q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), causal=True, window=3)
    torch.testing.assert_close(out.double(), ref.permute(2, 0, 1, 3).reshape(s, b, -1), rtol=1e-5, atol=1e-5)
    # Packed documents [0, 4) and [4, 10) of each sample: the second document alone gives the same outputs.
    from megatron_ext.layers.packing import packed_seq_params

    cu = torch.tensor([0, 4, 10, 14, 20], dtype=torch.int32)  # flat over b * s = 20 tokens
    packed = module(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None,
                    packed_seq_params=packed_seq_params(cu, s))
    alone = module(q[4:], k[4:], v[4:], None, attn_mask_type=AttnMaskType.causal, attention_bias=None,
                   packed_seq_params=None)
    torch.testing.assert_close(packed[4:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:4], out[:4], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_flex_and_sdpa_paths_match_on_gpu(window):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 4, 512, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    fast = attention(q, k, v, causal=True, window=window, impl="auto")
    ref = attention(q.float(), k.float(), v.float(), causal=True, window=window, impl="sdpa")
    torch.testing.assert_close(fast.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [None, 20])
def test_flex_document_and_window_masks_match_sdpa(window):
    """The FlexAttention path (eager on the CPU) equals SDPA with the dense document/band mask."""
    gen = torch.Generator().manual_seed(2)
    B, L = 2, 128
    q = torch.randn(B, 4, L, 16, generator=gen)
    k = torch.randn(B, 2, L, 16, generator=gen)
    v = torch.randn(B, 2, L, 16, generator=gen)
    cu = torch.tensor([0, 48, 128, 160, 256])  # flat over B * L, sample starts included
    flex = attention(q, k, v, causal=True, window=window, impl="flex", cu_seqlens=cu)
    sdpa = attention(q, k, v, causal=True, window=window, impl="sdpa", cu_seqlens=cu)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    # and the second document of sample 0 equals that document alone
    alone = attention(q[:1, :, 48:], k[:1, :, 48:], v[:1, :, 48:], causal=True, window=window, impl="sdpa")
    torch.testing.assert_close(flex[:1, :, 48:], alone, rtol=1e-5, atol=1e-5)
    if window is not None:
        plain = attention(q, k, v, causal=True, window=window, impl="flex")
        torch.testing.assert_close(plain, attention(q, k, v, causal=True, window=window, impl="sdpa"),
                                   rtol=1e-5, atol=1e-5)


def test_alibi_slopes_closed_form():
    from megatron_ext.layers.core_attention import alibi_slopes

    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    twelve = alibi_slopes(12)  # 8 slopes of 2^(-i), then every other one of the 16-head series
    torch.testing.assert_close(twelve[8:], torch.tensor([2.0 ** (-0.5 * (2 * i + 1)) for i in range(4)]))


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("window", [None, 9])
def test_alibi_matches_naive(impl, window):
    from megatron_ext.layers.core_attention import alibi_slopes

    gen = torch.Generator().manual_seed(4)
    q = torch.randn(1, 4, 40, 16, generator=gen)
    k = torch.randn(1, 2, 40, 16, generator=gen)
    v = torch.randn(1, 2, 40, 16, generator=gen)
    slopes = alibi_slopes(4)
    out = attention(q, k, v, causal=True, window=window, impl=impl, alibi=slopes)
    # naive: softmax(q k^T / sqrt(d) + slope_h * (j - i)) over the allowed keys
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double().repeat_interleave(2, dim=1)) / 4.0
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    logits = logits + slopes.double()[None, :, None, None] * (j - i)
    allowed = (j <= i) & ((i - j) <= window if window is not None else True)
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    ref = probs @ v.double().repeat_interleave(2, dim=1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
