"""The chunk memory: what the middle of the network hands to the retrieval layers above it.

One :class:`ChunkMemory` is built by the first retrieval layer of the model (HSA: the chunk encoder's K/V and
landmarks, shared by every HSA layer above; GCA: the encoder output and landmark keys) and travels up the decoder
as megatron-core's ``context`` (``TransformerBlock`` threads ``context`` from each layer's output to the next
layer's input). Each retrieval group's first layer attaches its :class:`Selection`; later layers of the group
reuse it. Plain SWA/full layers pass the object through untouched.

Everything here is tensors plus two ints, so a pipeline-parallel hand-off can send it between stages as it is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ChunkMemory", "Selection", "split_chunks", "merge_chunks", "without_sequence_parallel"]


def without_sequence_parallel(config):
    """A copy of ``config`` with ``sequence_parallel=False``.

    The chunk memory, retrieval and HSA/GCA modules run on the whole sequence (gathered by the retrieval layer when
    sequence parallelism is on) with plain tensor parallelism: their linears must not gather/scatter the sequence
    again, and their norms see every token, so their weights are not sequence-parallel partial sums.
    """
    if not getattr(config, "sequence_parallel", False):
        return config
    import copy

    config = copy.copy(config)
    config.sequence_parallel = False
    return config


@dataclass
class Selection:
    """A retrieval group's choice of chunks.

    HSA: indices/weights [B, L, Hk_local, K] (per token and local KV head).
    GCA: indices/weights [B, C, K] (per query chunk), plus the group's chunk K/V [B, C*S, Hk_local, D].
    indices are int32 (-1 = empty slot), weights fp32 (0 on empty slots, differentiable).
    """

    indices: torch.Tensor
    weights: torch.Tensor
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None


@dataclass
class ChunkMemory:
    """Chunk memory of one micro-batch.

    chunk_size: S; landmarks: HSA [B, C, R, Dr] / GCA [B, C, hidden]; keys/values: HSA's shared memory
    [B, C*S, Hk_local, D]; encoded: GCA's encoder output [B, C*S, hidden] (each group projects its own K/V);
    selection/group: the current retrieval group's selection and its group id; cu_seqlens: packed documents over
    the flattened B*L tokens (sample starts included), None when unpacked.
    """

    chunk_size: int
    landmarks: torch.Tensor
    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    encoded: Optional[torch.Tensor] = None
    selection: Optional[Selection] = None
    group: Optional[int] = None
    cu_seqlens: Optional[torch.Tensor] = None

    @property
    def num_chunks(self) -> int:
        return self.landmarks.shape[1]

    def with_selection(self, selection: Selection, group: int) -> "ChunkMemory":
        """A copy holding ``selection`` for ``group`` (the memory tensors are shared, not copied)."""
        return dataclasses.replace(self, selection=selection, group=group)


def split_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[s, b, h] (megatron layout) -> [S, b*C, h]: each chunk becomes one sequence of the encoder batch.

    Batch index of chunk c of sample i is i*C + c.
    """
    s, b, h = x.shape
    if s % chunk_size != 0:
        raise ValueError(
            f"sequence length {s} is not a multiple of hsa_chunk_size={chunk_size}: HSA/GCA need whole chunks; "
            f"use seq_length divisible by the chunk size"
        )
    C = s // chunk_size
    return x.reshape(C, chunk_size, b, h).permute(1, 2, 0, 3).reshape(chunk_size, b * C, h)


def merge_chunks(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[S, b*C, h] -> batch-first [b, C*S, h] (chunk c at rows [c*S, (c+1)*S))."""
    S, bc, h = x.shape
    C = bc // batch
    return x.reshape(S, batch, C, h).permute(1, 2, 0, 3).reshape(batch, C * S, h)
