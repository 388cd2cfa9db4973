"""The models give the same outputs and gradients on the Triton kernels (interpreter on CPU) as on the PyTorch
reference kernels: the layers feed both the same tensors."""

import pytest
import torch

from megatron_ext.models import build_model
from tests.models.tiny import FAMILIES, VOCAB, tiny_config

SEQ, CHUNK = 128, 16  # the GCA Triton kernels take chunks of 16..128


@pytest.mark.parametrize("family", ["swa_hsa", "drt_gca"])
def test_triton_and_reference_backends_agree(megatron_world, family):
    from megatron_ext.kernels.utils import resolve_backend

    assert resolve_backend("auto", torch.zeros(1)) == "triton", "this test needs the Triton interpreter on CPU"
    spec = dict(FAMILIES[family])
    pattern = spec.pop("pattern")
    spec.pop("hsa_gumbel_noise", None)
    results = []
    for backend in ("reference", "auto"):
        torch.manual_seed(0)
        model = build_model(tiny_config(pattern, hsa_kernel_backend=backend, seq_length=SEQ, hsa_chunk_size=CHUNK, **spec))
        if results:
            model.load_state_dict(results[0][2])
        tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))
        loss = model(tokens, torch.arange(SEQ)[None], None, labels=tokens.roll(-1, 1)).float().mean()
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{backend}: no gradient for {missing}"
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
        results.append((loss.item(), grads, state))
    (loss_ref, grads_ref, _), (loss_tri, grads_tri, _) = results
    assert abs(loss_ref - loss_tri) < 1e-5
    for name, g in grads_ref.items():
        err = (grads_tri[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-3, f"{name}: relative gradient difference {err:.2e}"


def test_fused_kernels_agree_with_megatron(megatron_world):
    """fused_kernel_backend='triton' (every RMSNorm, the rotary embedding of the SWA layers and the chunk encoder,
    and the loss on the Triton kernels, interpreter on CPU) against 'reference' (PyTorch norms, megatron's own RoPE
    and vocab-parallel cross entropy): same loss and gradients."""
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = build_model(tiny_config("swa [hsa swa]", fused_kernel_backend=backend, seq_length=64))
        if results:
            model.load_state_dict(results[0][2])
        tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(1))
        per_token = model(tokens, torch.arange(64)[None].expand(2, 64), None, labels=tokens.roll(-1, 1))
        assert per_token.shape == (2, 64) and per_token.dtype == torch.float32
        per_token.float().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
        results.append((per_token.detach(), grads, state))
    (loss_ref, grads_ref, _), (loss_fused, grads_fused, _) = results
    torch.testing.assert_close(loss_fused, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_fused.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        err = (grads_fused[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative gradient difference {err:.2e}"
