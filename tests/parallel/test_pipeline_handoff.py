"""The PP hand-off packs the chunk memory into a stage activation bit-exactly, and gradients come back the same way."""

import pytest
import torch

from megatron_ext.layers.chunk_memory import ChunkMemory, Selection
from megatron_ext.parallel.pipeline import pack_stage_output, unpack_stage_input


def _memory(gen):
    B, C, S, Hk, D, K = 2, 3, 4, 2, 8, 2
    return ChunkMemory(
        chunk_size=S,
        landmarks=torch.randn(B, C, 1, 16, generator=gen, requires_grad=True),
        keys=torch.randn(B, C * S, Hk, D, generator=gen).bfloat16().requires_grad_(),
        values=torch.randn(B, C * S, Hk, D, generator=gen).bfloat16().requires_grad_(),
        selection=Selection(
            indices=torch.randint(-1, C, (B, C * S, Hk, K), generator=gen, dtype=torch.int32),
            weights=torch.rand(B, C * S, Hk, K, generator=gen, requires_grad=True),
        ),
        group=1,
    )


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact_and_carries_gradients(hidden_dtype):
    gen = torch.Generator().manual_seed(0)
    memory = _memory(gen)
    hidden = torch.randn(12, 2, 16, generator=gen).to(hidden_dtype).requires_grad_()
    packed = pack_stage_output(hidden, memory)
    assert packed.dtype == hidden_dtype and packed.shape[1:] == hidden.shape[1:] and packed.shape[0] > hidden.shape[0]

    received = packed.detach().requires_grad_()  # what the next stage's receive buffer holds
    hidden2, memory2 = unpack_stage_input(received)
    assert torch.equal(hidden2, hidden)
    assert memory2.chunk_size == memory.chunk_size and memory2.group == memory.group and memory2.encoded is None
    for a, b in [(memory2.landmarks, memory.landmarks), (memory2.keys, memory.keys), (memory2.values, memory.values),
                 (memory2.selection.indices, memory.selection.indices),
                 (memory2.selection.weights, memory.selection.weights)]:
        assert a.dtype == b.dtype and torch.equal(a, b)

    # A loss in the next stage; its gradient flows to the received buffer and, through the sender's pack, back
    # to the tensors of the first stage: the same as computing the loss there directly.
    def loss(h, m):
        return (h.float().sin().sum() + m.landmarks.pow(2).sum() + (m.keys.float() * m.values.float()).sum()
                + (m.selection.weights * m.selection.indices.float()).sum())

    loss(hidden2, memory2).backward()
    packed.backward(received.grad)
    sent = [hidden, memory.landmarks, memory.keys, memory.values, memory.selection.weights]
    got = [t.grad.clone() for t in sent]
    for t in sent:
        t.grad = None
    loss(hidden, memory).backward()
    for g, t in zip(got, sent):
        assert torch.equal(g, t.grad)


def test_stage_without_memory_and_foreign_input():
    hidden = torch.randn(8, 1, 32)
    h2, m2 = unpack_stage_input(pack_stage_output(hidden, None))
    assert m2 is None and torch.equal(h2, hidden)
    with pytest.raises(RuntimeError, match="packed with the chunk memory"):
        unpack_stage_input(torch.zeros(8, 1, 32))
