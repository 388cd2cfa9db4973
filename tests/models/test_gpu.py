"""GPU checks of whole models (run with `make test-gpu`): Triton kernels vs the PyTorch reference inside the model,
and causality in bf16 with FlexAttention windows and the HSA/GCA kernels."""

import pytest
import torch

from megatron_ext.models import build_model
from tests.models.tiny import FAMILIES, VOCAB, tiny_config

SEQ, CHUNK = 512, 64
GPU_SIZES = dict(seq_length=SEQ, hsa_chunk_size=CHUNK, swa_window_size=48, hsa_topk=3, use_cpu_initialization=False,
                 hidden_size=128, num_attention_heads=16, num_query_groups=4, kv_channels=32)


def _gpu_model(family, **overrides):
    spec = dict(FAMILIES[family])
    pattern = spec.pop("pattern")
    spec.pop("hsa_gumbel_noise", None)
    spec.update(GPU_SIZES)
    spec.update(overrides)
    return build_model(tiny_config(pattern, **spec)).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["swa_hsa", "drt_gca"])
def test_triton_kernels_match_reference_in_the_model(megatron_world, family):
    torch.manual_seed(0)
    ref = _gpu_model(family, hsa_kernel_backend="reference")
    tri = _gpu_model(family, hsa_kernel_backend="auto")
    tri.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    positions = torch.arange(SEQ, device="cuda").expand(2, SEQ)
    losses = []
    for model in (ref, tri):
        loss = model(tokens, positions, None, labels=tokens.roll(-1, 1)).float().mean()
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-3 * abs(losses[0])
    for (name, p_ref), (_, p_tri) in zip(ref.named_parameters(), tri.named_parameters()):
        err = (p_tri.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)
        assert err < 2e-2, f"{name}: relative gradient difference {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["swa_hsa", "drt_gca", "gpt_swa"])
def test_causality_in_bf16_on_gpu(megatron_world, family):
    model = _gpu_model(family, bf16=True, params_dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, VOCAB, (1, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    positions = torch.arange(SEQ, device="cuda")[None]
    with torch.no_grad():
        base = model(tokens, positions, None)
        for t in (2 * CHUNK, 3 * CHUNK + 5, SEQ - 7):
            changed = tokens.clone()
            changed[:, t:] = (changed[:, t:] + 1) % VOCAB
            out = model(changed, positions, None)
            assert torch.equal(out[:, :t], base[:, :t]), f"{family}: outputs before t={t} changed"
            assert not torch.equal(out[:, t], base[:, t])


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["swa_hsa", "gpt_swa"])
def test_fused_kernels_match_megatron_in_the_model(megatron_world, family):
    """The Triton RMSNorm, RoPE and cross entropy ('auto' on CUDA) against PyTorch norms and megatron's RoPE and
    cross entropy ('reference'): in fp32 the same per-token losses and gradients; in bf16 the same losses within
    bf16 rounding (megatron's RoPE multiplies in bf16, the kernel in fp32)."""
    tokens = torch.randint(0, VOCAB, (2, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    positions = torch.arange(SEQ, device="cuda").expand(2, SEQ)
    for dtype, loss_tol, grad_tol in ((torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, None)):
        torch.manual_seed(0)
        opts = dict(bf16=True, params_dtype=torch.bfloat16) if dtype == torch.bfloat16 else {}
        ref = _gpu_model(family, fused_kernel_backend="reference", **opts)
        fused = _gpu_model(family, fused_kernel_backend="auto", **opts)
        fused.load_state_dict(ref.state_dict())
        losses = []
        for model in (ref, fused):
            per_token = model(tokens, positions, None, labels=tokens.roll(-1, 1))
            per_token.float().mean().backward()
            losses.append(per_token.detach().float())
        torch.testing.assert_close(losses[1], losses[0], rtol=loss_tol, atol=loss_tol)
        if grad_tol is None:
            continue
        for (name, p_ref), (_, p_fused) in zip(ref.named_parameters(), fused.named_parameters()):
            err = (p_fused.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)
            assert err < grad_tol, f"{dtype} {name}: relative gradient difference {err:.2e}"
