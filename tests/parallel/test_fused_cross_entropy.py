"""The fused cross entropy over a vocabulary split across 2 tensor-parallel ranks (gloo, Triton interpreter on CPU)
equals the full-vocabulary float64 cross entropy, loss and logit gradients, and so does its PyTorch reference."""

import torch
import torch.nn.functional as F

from megatron_ext.testing import run_on_ranks

ROWS, VOCAB = (6, 2), 130


def _vocab_parallel_loss_and_grad(logits, target, dloss):
    from megatron.core import parallel_state

    from megatron_ext.kernels.fused import cross_entropy, cross_entropy_reference

    group = parallel_state.get_tensor_model_parallel_group()
    part = logits.shape[-1] // group.size()
    out = {}
    for name, fn in (("triton", lambda x: cross_entropy(x, target, tp_group=group, backend="triton")),
                     ("reference", lambda x: cross_entropy_reference(x, target, tp_group=group))):
        local = logits[..., group.rank() * part : (group.rank() + 1) * part].clone().requires_grad_()
        loss = fn(local)
        (grad,) = torch.autograd.grad(loss, local, dloss)
        out[name] = (loss.detach(), grad)
    return out


def test_vocab_parallel_cross_entropy_equals_full_vocabulary():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(*ROWS, VOCAB, generator=gen) * 4
    target = torch.randint(0, VOCAB, ROWS, generator=gen)
    target[0, 0], target[0, 1] = VOCAB // 2 - 1, VOCAB // 2  # the last id of rank 0 and the first of rank 1
    dloss = torch.rand(ROWS, generator=gen)
    full = logits.double().requires_grad_()
    loss_ref = F.cross_entropy(full.reshape(-1, VOCAB), target.reshape(-1), reduction="none").view(ROWS)
    (grad_ref,) = torch.autograd.grad(loss_ref, full, dloss.double())
    results = run_on_ranks(_vocab_parallel_loss_and_grad, 2, logits, target, dloss,
                           parallel_sizes={"tensor_model_parallel_size": 2})
    for name in ("triton", "reference"):
        grads = []
        for rank, out in enumerate(results):
            loss, grad = out[name]
            torch.testing.assert_close(loss.double(), loss_ref.detach(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{name} loss, rank {rank}: {m}")
            grads.append(grad)
        torch.testing.assert_close(torch.cat(grads, -1).double(), grad_ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} logit gradients: {m}")
