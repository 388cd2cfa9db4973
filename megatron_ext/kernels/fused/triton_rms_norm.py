"""RMSNorm in Triton, forward and backward, and its autograd op (the math is ``reference.rms_norm_reference``).

The reference runs five or six fp32 element-wise kernels forward and about twice that backward, each a full pass
over an fp32 copy of x. Here the forward reads x once and writes y and one fp32 rstd per row; the backward reads x
and dy once and writes dx. A program holds BLOCK_R whole rows (many short rows for a QK-norm over a head dim, one
for a hidden-size norm).

Backward (x_hat = x * rstd, g = dy * w):  dx = rstd * (g - x_hat * mean(g * x_hat)),  dw = sum_rows dy * x_hat.
The backward runs a few programs per SM, each over a strided set of row blocks; dw is summed per program in fp32
and the per-program partial rows are added up afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_ext.kernels.utils import empty_output, interpreter_enabled, next_power_of_2

__all__ = ["RMSNormFunction", "MAX_WIDTH"]

# Rows wider than this do not fit one program's registers: ``ops.rms_norm`` runs them on the reference.
MAX_WIDTH = 32768
# Elements per program tile.
TILE_ELEMENTS = 4096


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, n_rows, eps,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
    y = x * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, n_rows,
    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_R
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(pid * BLOCK_R, n_rows, step):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        x_hat = x * rstd[:, None]
        if HAS_W:
            g = dy * w[None, :]
            dw += tl.sum(dy * x_hat, 0)
        else:
            g = dy
        c = tl.sum(g * x_hat, 1) / D
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(DW_PARTIAL + pid * D + cols, dw, mask=col_ok)


def _tiles(width: int) -> tuple[int, int, int]:
    """(rows per program, padded width, warps)."""
    block_d = next_power_of_2(width)
    block_r = max(1, TILE_ELEMENTS // block_d)
    elements = block_r * block_d
    return block_r, block_d, 4 if elements <= 4096 else (8 if elements <= 8192 else 16)


def _backward_programs(row_blocks: int, device: torch.device) -> int:
    if interpreter_enabled() or device.type != "cuda":
        return max(1, min(row_blocks, 4))
    return max(1, min(row_blocks, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


class RMSNormFunction(torch.autograd.Function):
    """forward(x [..., D], weight [D] or None, eps) -> y [..., D] in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        n = x2.shape[0]
        y = empty_output(n, D, device=x.device, dtype=x.dtype)
        rstd = empty_output(n, device=x.device, dtype=torch.float32)
        block_r, block_d, warps = _tiles(D)
        has_w = weight is not None
        w = weight.contiguous() if has_w else x2
        _rms_norm_fwd_kernel[(triton.cdiv(n, block_r),)](
            x2, w, y, rstd, n, eps, D=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_W=has_w, num_warps=warps,
        )
        ctx.save_for_backward(x2, w if has_w else None, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n, D = x2.shape
        dy2 = dy.reshape(n, D).contiguous()
        dx = empty_output(n, D, device=x2.device, dtype=x2.dtype)
        block_r, block_d, warps = _tiles(D)
        has_w = weight is not None
        programs = _backward_programs(triton.cdiv(n, block_r), x2.device)
        partial = torch.empty(programs if has_w else 1, D, device=x2.device, dtype=torch.float32)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight if has_w else x2, rstd, dx, partial, n,
            D=D, BLOCK_R=block_r, BLOCK_D=block_d, HAS_W=has_w, num_warps=warps,
        )
        dw = partial.sum(0).to(weight.dtype) if has_w and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None
