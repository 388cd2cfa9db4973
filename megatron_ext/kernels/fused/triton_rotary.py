"""Rotary position embedding in Triton, forward and backward, and its autograd op (``reference.rotary_reference``).

megatron-core without Transformer Engine rotates q and k with about eight separate kernels forward (cos, sin and
casts of the angles, the halves' negation and concatenation, two products and a sum, a final concatenation) and as
many backward. Here one program takes BLOCK_R rows of x viewed as ``[s * b * h, d]`` (the angles of row i are those
of position i // (b * h)), computes cos and sin in fp32 and writes the rotated row: one read and one write of x.

Backward (a rotation is orthogonal: its transpose rotates back):
  dx1 = dy1 cos f1 + dy2 sin f2,   dx2 = dy2 cos f2 - dy1 sin f1,   dx[r:] = dy[r:].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ext.kernels.utils import empty_output, next_power_of_2

__all__ = ["RotaryFunction"]

ROWS_PER_PROGRAM = 16


@triton.jit
def _rotary_kernel(
    X, F, Y, n_rows, rows_per_position,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    base = rows[:, None].to(tl.int64) * D
    pos = (rows // rows_per_position).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    h_ok = row_ok[:, None] & (h < HALF)[None, :]
    x1 = tl.load(X + base + h[None, :], mask=h_ok, other=0.0).to(tl.float32)
    x2 = tl.load(X + base + HALF + h[None, :], mask=h_ok, other=0.0).to(tl.float32)
    f1 = tl.load(F + pos[:, None] * (2 * HALF) + h[None, :], mask=h_ok, other=0.0)
    f2 = tl.load(F + pos[:, None] * (2 * HALF) + HALF + h[None, :], mask=h_ok, other=0.0)
    if BACKWARD:
        y1 = x1 * tl.cos(f1) + x2 * tl.sin(f2)
        y2 = x2 * tl.cos(f2) - x1 * tl.sin(f1)
    else:
        y1 = x1 * tl.cos(f1) - x2 * tl.sin(f1)
        y2 = x2 * tl.cos(f2) + x1 * tl.sin(f2)
    tl.store(Y + base + h[None, :], y1.to(Y.dtype.element_ty), mask=h_ok)
    tl.store(Y + base + HALF + h[None, :], y2.to(Y.dtype.element_ty), mask=h_ok)
    if BLOCK_P > 0:  # channels past the rotated ones pass through
        p = 2 * HALF + tl.arange(0, BLOCK_P)
        p_ok = row_ok[:, None] & (p < D)[None, :]
        tl.store(Y + base + p[None, :], tl.load(X + base + p[None, :], mask=p_ok), mask=p_ok)


def _rotate(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    s, d, r = x.shape[0], x.shape[-1], freqs.shape[-1]
    x2 = x.contiguous().view(-1, d)
    n = x2.shape[0]
    y = empty_output(n, d, device=x.device, dtype=x.dtype)
    half = r // 2
    _rotary_kernel[(triton.cdiv(n, ROWS_PER_PROGRAM),)](
        x2, freqs, y, n, n // s,
        D=d, HALF=half, BLOCK_H=max(2, next_power_of_2(half)), BLOCK_P=0 if r == d else next_power_of_2(d - r),
        BLOCK_R=ROWS_PER_PROGRAM, BACKWARD=backward, num_warps=4,
    )
    return y.view(x.shape)


class RotaryFunction(torch.autograd.Function):
    """forward(x [s, b, h, d], freqs fp32 [s, r] contiguous) -> rotated x; no gradient to the angles."""

    @staticmethod
    def forward(ctx, x, freqs):
        ctx.save_for_backward(freqs)
        return _rotate(x, freqs, backward=False)

    @staticmethod
    def backward(ctx, dy):
        (freqs,) = ctx.saved_tensors
        return _rotate(dy, freqs, backward=True), None
