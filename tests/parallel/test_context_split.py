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


class _FakeGroup:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_training_batch_is_cut_like_megatron_rope_expects():
    from megatron_ext.parallel.context import batch_for_this_cp_rank

    s = 16
    batch = {"tokens": torch.arange(s)[None], "labels": torch.arange(s)[None] + 1, "loss_mask": torch.ones(1, s),
             "position_ids": torch.arange(s)[None], "attention_mask": None, "packed_seq_params": None}
    out = batch_for_this_cp_rank(batch, _FakeGroup(1, 2))
    assert out["position_ids"][0].tolist() == global_positions(s, 1, 2).tolist()
    assert torch.equal(out["labels"], out["tokens"] + 1) and out["loss_mask"].shape == (1, s // 2)
    assert batch_for_this_cp_rank(batch, _FakeGroup(0, 1)) is batch
    with pytest.raises(ValueError, match="unpacked samples"):
        batch_for_this_cp_rank({**batch, "packed_seq_params": object()}, _FakeGroup(0, 2))
