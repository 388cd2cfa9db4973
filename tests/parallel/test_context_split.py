"""megatron's context-parallel sequence layout, as megatron_ext.parallel.context implements it."""

import pytest
import torch

from megatron_ext.parallel.context import _global_order, global_positions, split_for_context_parallel


@pytest.mark.parametrize("cp", [2, 4])
def test_split_positions_and_reassembly_agree(cp):
    seq = torch.arange(48)
    parts = [split_for_context_parallel(seq, 0, r, cp, chunk_size=2) for r in range(cp)]
    for r, part in enumerate(parts):
        assert torch.equal(part, global_positions(48, r, cp))  # a token's value is its global position
        assert part.numel() == 48 // cp
    assert torch.equal(_global_order(parts, 0), seq)  # what gather_sequence returns


def test_rank_holds_pieces_r_and_mirror():
    assert global_positions(16, 0, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert global_positions(16, 1, 2).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_split_refuses_to_cut_a_chunk():
    with pytest.raises(ValueError, match="not a multiple of hsa_chunk_size=8"):
        split_for_context_parallel(torch.zeros(1, 48), 1, 0, 2, chunk_size=8)  # pieces of 12 tokens
    with pytest.raises(ValueError, match="multiple of 4"):
        split_for_context_parallel(torch.zeros(1, 30), 1, 0, 2)
