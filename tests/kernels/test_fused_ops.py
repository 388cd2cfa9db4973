"""Fused element-wise kernels (RMSNorm, rotary embedding, vocabulary cross entropy) against float64 oracles:
the reference formulas, torch's cross entropy and megatron-core's own RoPE.

On CPU the kernels run in the Triton interpreter (fp32 / fp16, small shapes, outputs poisoned by
tests/kernels/conftest.py); bf16 at the 345M model's shapes needs a GPU.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.kernels.fused import (
    cross_entropy,
    rms_norm,
    rms_norm_reference,
    rotary,
    rotary_reference,
    runs_triton,
)
from tests.kernels.common import DEVICE, rel_err

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def check_rms_norm(shape, dtype, with_weight=True, eps=1e-5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = (torch.randn(*shape, generator=gen) * 3 + 0.5).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.2 * torch.randn(D, generator=gen)).to(DEVICE, dtype).requires_grad_() if with_weight else None
    y = rms_norm(x, w, eps, backend="triton")
    dy = torch.randn(shape, generator=gen).to(DEVICE, dtype)
    inputs = (x, w) if with_weight else (x,)
    grads = torch.autograd.grad(y, inputs, dy)
    # Oracle: the reference formula in float64 on the same (rounded) inputs.
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    y_ref = rms_norm_reference(ref_inputs[0], ref_inputs[1] if with_weight else None, eps)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < TOL[dtype], ("y", rel_err(y, y_ref))
    for name, g, g_ref in zip(("dx", "dw"), grads, grads_ref):
        assert g.dtype == dtype
        assert rel_err(g, g_ref) < TOL[dtype], (name, rel_err(g, g_ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [
        (3, 37, 4, 64),  # a QK-norm over heads of 64: many short rows per program, rows not a multiple of the tile
        (2, 5, 96),  # a width that is not a power of two
        (7, 1000),  # a hidden-size norm: one row per program
        (1, 1, 16),
    ],
)
def test_rms_norm_matches_reference(shape, dtype):
    check_rms_norm(shape, dtype)


def test_rms_norm_without_weight_and_with_large_eps():
    check_rms_norm((4, 9, 32), torch.float32, with_weight=False)
    check_rms_norm((4, 9, 32), torch.float32, eps=0.5)


def test_rms_norm_non_contiguous_input():
    x = torch.randn(6, 8, 64).to(DEVICE).transpose(0, 1)  # rows are strided: the op copies, the result is exact
    w = torch.randn(64).to(DEVICE)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, backend="triton"), rms_norm_reference(x, w, 1e-6))


def test_rms_norm_backend_choice_and_errors():
    cpu = torch.zeros(2, 4)
    # On a CPU, "auto" keeps PyTorch even with the interpreter on: these kernels would only slow a model down there.
    assert not runs_triton("auto", cpu) and runs_triton("triton", cpu) and not runs_triton("reference", cpu)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):  # forced kernels name the dtype
        rms_norm(cpu.double(), None, 1e-5, backend="triton")
    x64 = torch.randn(3, 8, dtype=torch.float64)  # "auto" leaves other dtypes to PyTorch
    torch.testing.assert_close(rms_norm(x64, None, 1e-5), rms_norm_reference(x64, None, 1e-5))
    assert not runs_triton("auto", x64.to(DEVICE))
    with pytest.raises(ValueError, match="weight must be \\[4\\]"):
        rms_norm(cpu, torch.ones(5), 1e-5)
    from megatron_ext.kernels.fused.triton_rms_norm import MAX_WIDTH

    wide = torch.randn(1, MAX_WIDTH + 1).to(DEVICE)
    with pytest.raises(ValueError, match="at most"):
        rms_norm(wide, None, 1e-5, backend="triton")
    torch.testing.assert_close(rms_norm(wide, None, 1e-5, backend="auto"), rms_norm_reference(wide, None, 1e-5))


def check_rotary(s, b, h, d, r, dtype, seed=0):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    gen = torch.Generator().manual_seed(seed)
    half = torch.rand(s, 1, 1, r // 2, generator=gen, dtype=torch.float64) * torch.arange(s)[:, None, None, None]
    freqs = torch.cat([half, half], dim=-1)  # megatron's RotaryEmbedding layout: the angles twice
    x = torch.randn(s, b, h, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    y = rotary(x, freqs.float().to(DEVICE), backend="triton")
    dy = torch.randn(s, b, h, d, generator=gen).to(DEVICE, dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    y_ref = _apply_rotary_pos_emb_bshd(x64, freqs.to(DEVICE))  # megatron's unfused RoPE, in float64
    (dx_ref,) = torch.autograd.grad(y_ref, x64, dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y_ref) < TOL[dtype], ("y", rel_err(y, y_ref))
    assert rel_err(dx, dx_ref) < TOL[dtype], ("dx", rel_err(dx, dx_ref))
    # the reference's fp32 angles: cos/sin of angles up to s radians carry ~s * 2^-24 of absolute error
    assert rel_err(rotary_reference(x64, freqs.to(DEVICE)), y_ref) < max(1e-6, 2 * s * 2.0**-24)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("s,b,h,d,r", [(37, 2, 3, 64, 64), (9, 1, 5, 24, 16), (5, 3, 2, 12, 12), (70, 1, 1, 6, 2)])
def test_rotary_matches_megatron(s, b, h, d, r, dtype):
    check_rotary(s, b, h, d, r, dtype)


def test_rotary_checks_its_inputs():
    with pytest.raises(ValueError, match="freqs \\[s, 1, 1, r\\]"):
        rotary(torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 10))
    with pytest.raises(ValueError, match="even r"):
        rotary(torch.zeros(4, 1, 2, 8), torch.zeros(4, 1, 1, 3))


def check_cross_entropy(rows_shape, V, dtype, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*rows_shape, V, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()
    target = torch.randint(0, V, rows_shape, generator=gen)
    target.view(-1)[:2] = torch.tensor([0, V - 1])[: target.numel()]  # both ends of the vocabulary
    target = target.to(DEVICE)
    loss = cross_entropy(logits, target, backend="triton")
    dloss = torch.rand(rows_shape, generator=gen).to(DEVICE)
    (grad,) = torch.autograd.grad(loss, logits, dloss)
    ref_logits = logits.detach().double().requires_grad_()
    loss_ref = F.cross_entropy(ref_logits.reshape(-1, V), target.reshape(-1), reduction="none").view(rows_shape)
    (grad_ref,) = torch.autograd.grad(loss_ref, ref_logits, dloss.double())
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert rel_err(loss, loss_ref) < 1e-5, ("loss", rel_err(loss, loss_ref))
    assert grad.dtype == dtype
    assert rel_err(grad, grad_ref) < TOL[dtype], ("dlogits", rel_err(grad, grad_ref))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows_shape, V", [((5, 3), 300), ((4,), 64), ((2, 2), 1), ((9,), 97)])
def test_cross_entropy_matches_torch(rows_shape, V, dtype):
    check_cross_entropy(rows_shape, V, dtype)


def test_cross_entropy_is_stable_for_large_logits():
    check_cross_entropy((6,), 200, torch.float32, scale=3000.0)


def test_cross_entropy_checks_its_inputs():
    with pytest.raises(ValueError, match="need target of shape"):
        cross_entropy(torch.zeros(3, 4, 10), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        cross_entropy(torch.zeros(3, 10), torch.zeros(3))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8192, 2, 1024), (8192, 2, 16, 64), (8192, 2, 2, 64)])
def test_rms_norm_bf16_model_shapes(shape):
    check_rms_norm(shape, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("h", [16, 2])
def test_rotary_bf16_model_shapes(h):
    check_rotary(8192, 2, h, 64, 64, torch.bfloat16)


@pytest.mark.gpu
def test_cross_entropy_bf16_full_vocabulary():
    check_cross_entropy((2048, 2), 100278, torch.bfloat16, scale=4.0)
