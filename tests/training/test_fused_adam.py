"""megatron_ext.training.fused_adam: torch's fused AdamW in place of megatron's foreach fallback."""

import types

import pytest
import torch

from megatron_ext.training.fused_adam import use_fused_adam


def _adamw(params, **kw):
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, **kw)


def test_cpu_parameters_are_left_alone():
    opt = _adamw([torch.nn.Parameter(torch.randn(4, 4))])
    wrapped = types.SimpleNamespace(optimizer=opt)  # megatron optimizers keep the torch one in .optimizer
    assert use_fused_adam(wrapped) == 0
    assert not opt.param_groups[0]["fused"]
    sgd = types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=torch.optim.SGD(
        [torch.nn.Parameter(torch.randn(2))], lr=0.1))])
    assert use_fused_adam(sgd) == 0


@pytest.mark.gpu
def test_fused_switch_gives_the_foreach_update_after_state_exists():
    torch.manual_seed(0)
    init = [torch.randn(257, 129, device="cuda"), torch.randn(1000, device="cuda")]
    grads = [[torch.randn_like(p) for p in init] for _ in range(4)]
    results = []
    for switch_after in (None, 0, 2):  # never (foreach), before the first step, after two foreach steps
        params = [torch.nn.Parameter(p.clone()) for p in init]
        opt = _adamw(params, foreach=True)
        chained = types.SimpleNamespace(chained_optimizers=[types.SimpleNamespace(optimizer=opt)])
        for i, step_grads in enumerate(grads):
            if switch_after == i:
                assert use_fused_adam(chained) == 1
                assert opt.param_groups[0]["fused"] and not opt.param_groups[0]["foreach"]
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        if switch_after is not None:
            assert all(s["step"].is_cuda and float(s["step"]) == 4 for s in opt.state.values())
        results.append([p.detach() for p in params])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
