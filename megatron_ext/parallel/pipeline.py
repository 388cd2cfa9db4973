"""Pipeline parallelism for retrieval models: the chunk memory crosses stage boundaries inside the activation.

The first retrieval layer builds the :class:`~megatron_ext.layers.chunk_memory.ChunkMemory` (encoder K/V, landmarks)
and megatron's ``TransformerBlock`` threads it from layer to layer as ``context``; a retrieval group's selection
rides along. megatron-core's pipeline schedules send one activation tensor between stages, so at a stage boundary
:func:`pack_stage_output` appends everything the memory holds to that tensor, *bit for bit* (int32 indices, fp32
weights and landmarks and bf16 K/V all travel unchanged inside a tensor of the pipeline dtype), and the next stage's
:func:`unpack_stage_input` takes it apart. Both are autograd functions: the gradients of the memory tensors travel
back in the same bytes of the activation gradient, so the chunk encoder in stage 0 learns from HSA layers in stage 3.

Layout of the stage output ``[R + s, b, h]`` (pipeline dtype): R payload rows, then the hidden state ``[s, b, h]``.
The payload starts with an int64 header (magic, R, the length of a structural spec, the spec) and then each tensor,
16-byte aligned. The spec lists the memory's dataclass fields in order (None / int / tensor dtype+shape / nested
dataclass), so nothing about the model needs to be known to unpack it. A stage without memory sends a payload that
says so. Shapes differ between boundaries, so the model sets ``config.variable_seq_lengths`` (the schedules then
exchange shapes before each transfer).

:func:`install_chunk_memory_handoff` wires this into a ``GPTModel`` built for one pipeline stage.
"""

from __future__ import annotations

import torch

from megatron_ext.layers.chunk_memory import decode_memory, encode_memory, memory_tensor_layouts

__all__ = ["pack_stage_output", "unpack_stage_input", "install_chunk_memory_handoff"]

_MAGIC = 0x48534150  # "HSAP"
_ALIGN = 16


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _byte_offsets(header_len: int, layouts) -> tuple[list[int], int]:
    """Byte offset of each tensor in the payload, and the payload's unpadded size."""
    offset = _round_up(8 * header_len, _ALIGN)
    offsets = []
    for dtype, shape in layouts:
        offsets.append(offset)
        offset = _round_up(offset + torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size(), _ALIGN)
    return offsets, offset


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _from_bytes(buf: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    return buf[offset : offset + n].view(dtype).reshape(shape)


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, header, offsets, payload_rows, *tensors):
        s, b, h = hidden.shape
        row_bytes = b * h * hidden.element_size()
        payload = torch.zeros(payload_rows * row_bytes, dtype=torch.uint8, device=hidden.device)
        payload[: 8 * len(header)] = _as_bytes(torch.tensor(header, dtype=torch.int64, device=hidden.device))
        for t, off in zip(tensors, offsets):
            raw = _as_bytes(t)
            payload[off : off + raw.numel()] = raw
        ctx.layouts = [(t.dtype, tuple(t.shape)) for t in tensors]
        ctx.offsets, ctx.payload_rows = offsets, payload_rows
        return torch.cat([payload.view(hidden.dtype).reshape(payload_rows, b, h), hidden], dim=0)

    @staticmethod
    def backward(ctx, grad):
        R = ctx.payload_rows
        raw = _as_bytes(grad[:R])
        grads = []
        for (dtype, shape), off, needs in zip(ctx.layouts, ctx.offsets, ctx.needs_input_grad[4:]):
            grads.append(_from_bytes(raw, off, dtype, shape).clone() if needs and dtype.is_floating_point else None)
        return (grad[R:], None, None, None, *grads)


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, packed, payload_rows, layouts, offsets):
        raw = _as_bytes(packed[:payload_rows])
        tensors = [_from_bytes(raw, off, dtype, shape).clone() for (dtype, shape), off in zip(layouts, offsets)]
        ctx.mark_non_differentiable(*[t for t in tensors if not t.dtype.is_floating_point])
        ctx.layouts, ctx.offsets, ctx.payload_rows = layouts, offsets, payload_rows
        return (packed[payload_rows:].clone(), *tensors)

    @staticmethod
    def backward(ctx, grad_hidden, *grad_tensors):
        s, b, h = grad_hidden.shape
        R = ctx.payload_rows
        payload = torch.zeros(R * b * h * grad_hidden.element_size(), dtype=torch.uint8, device=grad_hidden.device)
        for (dtype, shape), off, g in zip(ctx.layouts, ctx.offsets, grad_tensors):
            if g is not None and dtype.is_floating_point:
                raw = _as_bytes(g.to(dtype))
                payload[off : off + raw.numel()] = raw
        grad_payload = payload.view(grad_hidden.dtype).reshape(R, b, h)
        return torch.cat([grad_payload, grad_hidden], dim=0), None, None, None


def pack_stage_output(hidden: torch.Tensor, memory) -> torch.Tensor:
    """hidden [s, b, h] + chunk memory (or None) -> [R + s, b, h] in hidden's dtype (see the module docstring)."""
    spec, tensors = encode_memory(memory)
    header = [_MAGIC, 0, len(spec), *spec]
    offsets, size = _byte_offsets(len(header), [(t.dtype, tuple(t.shape)) for t in tensors])
    s, b, h = hidden.shape
    row_bytes = b * h * hidden.element_size()
    if row_bytes < 24:
        raise ValueError(f"a stage activation row of {row_bytes} bytes cannot hold the hand-off header")
    payload_rows = _round_up(size, row_bytes) // row_bytes
    header[1] = payload_rows
    return _Pack.apply(hidden, header, offsets, payload_rows, *tensors)


def unpack_stage_input(packed: torch.Tensor):
    """Inverse of :func:`pack_stage_output`: [R + s, b, h] -> (hidden [s, b, h], chunk memory or None)."""
    raw = _as_bytes(packed[:1].detach())
    magic, payload_rows, spec_len = raw[:24].view(torch.int64).tolist()
    if magic != _MAGIC:
        raise RuntimeError(
            "this pipeline stage expected an activation packed with the chunk memory (megatron_ext.parallel."
            "pipeline); the previous stage sent a plain one: build every stage with megatron_ext.models.build_model"
        )
    header_bytes = 8 * (3 + spec_len)
    spec = _as_bytes(packed[:payload_rows].detach())[24:header_bytes].view(torch.int64).tolist()
    layouts = memory_tensor_layouts(spec)
    offsets, _ = _byte_offsets(3 + spec_len, layouts)
    hidden, *tensors = _Unpack.apply(packed, payload_rows, layouts, offsets)
    memory = decode_memory(spec, tensors)
    return hidden, memory


def install_chunk_memory_handoff(model) -> None:
    """Make a ``GPTModel`` stage receive and send the chunk memory with its activation (no-op without PP).

    The decoder block of a stage that is not the first unpacks its input (when megatron's schedule sets it) into
    hidden state + memory and passes the memory to its first layer as ``context``; a stage that is not the last packs its output with the ``context``
    its last layer returned.
    """
    block = model.decoder
    config = model.config
    if config.pipeline_model_parallel_size == 1 or getattr(block, "_chunk_memory_handoff", False):
        return
    if config.pipeline_model_parallel_size == 2 and (config.virtual_pipeline_model_parallel_size or 1) > 1:
        # Variable shapes make the schedule exchange each activation's shape first; with two stages and virtual
        # stages, megatron-core 0.19.2 sends the forward and the backward shape to the same peer in one batched
        # isend/irecv, which pairs them by posting order and swaps them (seen on gloo: mismatched tensor sizes).
        raise ValueError(
            "retrieval models cannot use a virtual pipeline with pipeline_model_parallel_size=2 (megatron-core "
            "swaps the activation shapes of the two directions); use PP=2 without virtual stages, or PP>=3"
        )
    config.variable_seq_lengths = True  # boundaries carry different payloads
    block._chunk_memory_handoff = True
    block._stage_context = None
    if len(block.layers):
        block.layers[-1].register_forward_hook(lambda module, args, out: setattr(block, "_stage_context", out[1]))
    original_forward = block.forward
    original_set_input_tensor = block.set_input_tensor
    block._received_memory = None

    def set_input_tensor(input_tensor):
        # Unpack here, not in forward: GPTModel sizes RoPE from the block's input tensor before calling the block.
        block._received_memory = None
        if input_tensor is not None and not block.pre_process:
            input_tensor, block._received_memory = unpack_stage_input(input_tensor)
        original_set_input_tensor(input_tensor)

    def forward(*args, **kwargs):
        memory, block._received_memory = block._received_memory, None
        if memory is not None:
            if len(args) > 2:
                args = args[:2] + (memory,) + args[3:]
            else:
                kwargs["context"] = memory
        block._stage_context = None
        out = original_forward(*args, **kwargs)
        if not block.post_process:
            out = pack_stage_output(out, block._stage_context)
        block._stage_context = None  # do not keep the graph alive past this micro-batch
        return out

    block.set_input_tensor = set_input_tensor
    block.forward = forward
