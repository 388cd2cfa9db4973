"""Packed sequences: a document packed after others gives the same outputs as that document alone."""

import pytest
import torch

from megatron_ext.layers.packing import packed_seq_params
from megatron_ext.models import build_model
from tests.models.tiny import CHUNK, FAMILIES, SEQ, VOCAB, tiny_config


def _model(family):
    spec = dict(FAMILIES[family])
    pattern = spec.pop("pattern")
    return build_model(tiny_config(pattern, hsa_topk=3, **spec)).eval()


@pytest.mark.parametrize("family", ["gpt_full", "gpt_swa", "swa_hsa", "drt_gca"])
def test_packed_document_equals_the_document_alone(megatron_world, family):
    model = _model(family)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
    # Sample 0: documents [0, 32) and [32, 64); sample 1: [64, 80) and [80, 128) (offsets over the flat batch).
    cu = torch.tensor([0, 4 * CHUNK, 8 * CHUNK, 10 * CHUNK, 16 * CHUNK], dtype=torch.int32)
    positions = torch.arange(SEQ).expand(2, SEQ)
    with torch.no_grad():
        packed = model(tokens, positions, None, packed_seq_params=packed_seq_params(cu, SEQ))
        for sample, start, end in ((0, 4 * CHUNK, SEQ), (1, 2 * CHUNK, SEQ), (0, 0, 4 * CHUNK)):
            alone_tokens = tokens[sample : sample + 1, start:end]
            n = end - start
            alone = model(alone_tokens, torch.arange(n)[None], None)
            torch.testing.assert_close(packed[sample : sample + 1, start:end], alone, rtol=1e-4, atol=1e-4,
                                       msg=f"{family}: document [{start}, {end}) of sample {sample}")
        # The packed documents differ from an unpacked run, which lets later documents see earlier ones.
        unpacked = model(tokens, positions, None)
        assert (unpacked[0, 4 * CHUNK :] - packed[0, 4 * CHUNK :]).abs().max() > 1e-3


def test_thd_layout_is_refused(megatron_world):
    from megatron.core.packed_seq_params import PackedSeqParams

    model = _model("swa_hsa")
    cu = torch.tensor([0, 32, 64], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=32, max_seqlen_kv=32)
    tokens = torch.zeros(1, SEQ, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="sbhd"):
        model(tokens, torch.arange(SEQ)[None], None, packed_seq_params=params)


def test_flat_offsets_are_computed_once_per_step_params():
    """Every attention layer asks for the flat offsets; they are computed (with their host synchronisations) for the
    first and kept on that step's params, and recomputed for new params or another shape."""
    from megatron_ext.layers.packing import flat_cu_seqlens, packed_seq_params

    params = packed_seq_params(torch.tensor([0, 16, 48, 64, 128]), 64)
    first = flat_cu_seqlens(params, 2, 64, "cpu")
    assert first.tolist() == [0, 16, 48, 64, 128]
    assert flat_cu_seqlens(params, 2, 64, "cpu") is first
    assert flat_cu_seqlens(params, 4, 32, "cpu").tolist() == [0, 16, 32, 48, 64, 96, 128]
    other = packed_seq_params(torch.tensor([0, 32, 128]), 64)
    assert flat_cu_seqlens(other, 2, 64, "cpu").tolist() == [0, 32, 64, 128]


def test_flat_offsets_out_of_order_are_refused():
    """Offsets out of order are an error, not silently sorted into other documents."""
    from megatron_ext.layers.packing import flat_cu_seqlens, packed_seq_params

    with pytest.raises(ValueError, match="non-decreasing"):
        flat_cu_seqlens(packed_seq_params(torch.tensor([0, 64, 32, 128]), 64), 2, 64, "cpu")
    assert flat_cu_seqlens(packed_seq_params(torch.tensor([0, 32, 32, 128]), 64), 2, 64, "cpu").tolist() == [
        0, 32, 64, 128
    ]
