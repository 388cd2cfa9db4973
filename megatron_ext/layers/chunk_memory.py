"""The chunk memory: what the middle of the network hands to the retrieval layers above it.

One :class:`ChunkMemory` is built by the first retrieval layer of the model (HSA: the chunk encoder's K/V and
landmarks, shared by every HSA layer above; GCA: the encoder output and landmark keys) and travels up the decoder
as megatron-core's ``context`` (``TransformerBlock`` threads ``context`` from each layer's output to the next
layer's input). Each retrieval group's first layer attaches its :class:`Selection`; later layers of the group
reuse it. Plain SWA/full layers pass the object through untouched.

Everything here is tensors plus two ints: :func:`encode_memory` turns a memory into a flat list of tensors and a
spec of ints, and :func:`decode_memory` rebuilds it, so a pipeline-parallel hand-off can send it between stages and
a recomputed layer can take and return it as plain tensor arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ChunkMemory", "Selection", "split_chunks", "merge_chunks", "without_sequence_parallel", "encode_memory",
           "decode_memory", "memory_tensor_layouts"]


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


# ---- flat form: the spec lists the dataclass fields in order (None / int / tensor dtype + shape / nested dataclass)
_NONE, _INT, _TENSOR, _DATACLASS = 0, 1, 2, 3
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.int64, torch.bool, torch.uint8,
           torch.float64]
_CLASSES = [ChunkMemory, Selection]


def encode_memory(memory: Optional[ChunkMemory]) -> tuple[list[int], list[torch.Tensor]]:
    """(spec, tensors) of a chunk memory (or None): the tensors in field order, the rest of the structure in ints."""
    spec: list[int] = []
    tensors: list[torch.Tensor] = []
    _encode(memory, spec, tensors)
    return spec, tensors


def decode_memory(spec: list[int], tensors) -> Optional[ChunkMemory]:
    """Inverse of :func:`encode_memory` (``tensors`` in the order it gave them)."""
    memory, _ = _decode(spec, 0, list(tensors))
    return memory


def memory_tensor_layouts(spec: list[int]) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every tensor the spec names, in order."""
    out, pos = [], 0
    while pos < len(spec):
        kind = spec[pos]
        if kind == _NONE:
            pos += 1
        elif kind == _INT:
            pos += 2
        elif kind == _TENSOR:
            ndim = spec[pos + 2]
            out.append((_DTYPES[spec[pos + 1]], tuple(spec[pos + 3 : pos + 3 + ndim])))
            pos += 3 + ndim
        else:
            pos += 3
    return out


def _encode(value, spec: list[int], tensors: list[torch.Tensor]) -> None:
    if value is None:
        spec.append(_NONE)
    elif isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)) and not dataclasses.is_dataclass(value):
        raise TypeError(f"the chunk memory's flat form cannot hold a {type(value).__name__}")
    elif isinstance(value, int):
        spec += [_INT, value]
    elif isinstance(value, torch.Tensor):
        if value.dtype not in _DTYPES:
            raise TypeError(f"the chunk memory's flat form cannot hold dtype {value.dtype}")
        spec += [_TENSOR, _DTYPES.index(value.dtype), value.dim(), *value.shape]
        tensors.append(value)
    else:
        fields = dataclasses.fields(value)
        spec += [_DATACLASS, _CLASSES.index(type(value)), len(fields)]
        for f in fields:
            _encode(getattr(value, f.name), spec, tensors)


def _decode(spec: list[int], pos: int, tensors: list[torch.Tensor]):
    """-> (value, next position); ``tensors`` are consumed in order."""
    kind = spec[pos]
    if kind == _NONE:
        return None, pos + 1
    if kind == _INT:
        return spec[pos + 1], pos + 2
    if kind == _TENSOR:
        ndim = spec[pos + 2]
        return tensors.pop(0), pos + 3 + ndim
    cls = _CLASSES[spec[pos + 1]]
    n = spec[pos + 2]
    pos += 3
    values = []
    for _ in range(n):
        v, pos = _decode(spec, pos, tensors)
        values.append(v)
    return cls(*values), pos
