"""Switch megatron's torch-AdamW fallback to torch's fused (single-kernel) AdamW.

Without apex or Transformer Engine, megatron-core 0.19.2 builds ``torch.optim.AdamW`` with its defaults, which on a
GPU is the ``foreach`` implementation: about ten passes over every fp32 main parameter and moment per step. torch's
``fused=True`` AdamW does the same update in one pass (same formula: PyTorch tests the two against each other), which
matters for models whose optimizer step is a visible share of the iteration (the 8B-A1B MoE: 1.4 B parameters per
GPU at EP 1). megatron exposes no option for it, so this flips ``fused`` on the param groups of the torch optimizers
inside a built megatron optimizer, before their state exists or after (step counters move to the GPU, as fused
AdamW keeps them there).
"""

from __future__ import annotations

import torch

__all__ = ["install", "use_fused_adam"]

_INSTALLED = False


def _torch_optimizers(optimizer):
    """The torch optimizers inside a megatron optimizer (chained, distributed, mixed precision or plain)."""
    for inner in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        torch_opt = getattr(inner, "optimizer", inner)
        if isinstance(torch_opt, torch.optim.Optimizer):
            yield torch_opt


def use_fused_adam(optimizer) -> int:
    """Make every torch Adam/AdamW inside ``optimizer`` fused when all its parameters are CUDA floating-point
    tensors; returns how many were switched (0 on CPU, with apex/TE's FusedAdam, or for other optimizers)."""
    switched = 0
    for torch_opt in _torch_optimizers(optimizer):
        if type(torch_opt) not in (torch.optim.Adam, torch.optim.AdamW):
            continue
        params = [p for group in torch_opt.param_groups for p in group["params"]]
        if not params or not all(p.is_cuda and p.is_floating_point() for p in params):
            continue
        for group in torch_opt.param_groups:
            if group.get("differentiable"):
                break
        else:
            for group in torch_opt.param_groups:
                group["fused"], group["foreach"] = True, False
            for state in torch_opt.state.values():
                step = state.get("step")
                if torch.is_tensor(step) and not step.is_cuda:
                    state["step"] = step.to(device=next(iter(params)).device, dtype=torch.float32)
            torch_opt._step_supports_amp_scaling = True
            switched += 1
    return switched


def install() -> None:
    """Make ``megatron.training`` pass every optimizer it builds through :func:`use_fused_adam` (idempotent).

    ``pretrain()`` builds its optimizer inside ``setup_model_and_optimizer`` with no hook of its own; this wraps the
    ``get_megatron_optimizer`` that module calls, as ``logging.install`` wraps ``training_log``."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.training import training as megatron_training

    original = megatron_training.get_megatron_optimizer

    def get_megatron_optimizer(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        use_fused_adam(optimizer)
        return optimizer

    get_megatron_optimizer.__doc__ = original.__doc__
    megatron_training.get_megatron_optimizer = get_megatron_optimizer
    _INSTALLED = True
