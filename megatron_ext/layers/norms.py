"""Norms that enter megatron-core through the ``LayerNormBuilder`` slots (``norm(config=, hidden_size=, eps=)``).

megatron-core's own fallback without apex or Transformer Engine, ``WrappedTorchNorm``, refuses sequence parallelism.
:class:`RMSNorm` here works with it: its weight is replicated over the tensor-parallel group and tagged
``sequence_parallel`` so that megatron's ``finalize_model_grads`` all-reduces its gradient over that group (each
rank only saw its own slice of the sequence).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and returned in x's dtype. x: [..., D]."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; usable as megatron's ``input_layernorm``/``q_layernorm``/... builder.

    config: a TransformerConfig (for params_dtype, sequence_parallel and CPU initialisation);
    hidden_size: the normalised width (the head dim when used as a QK-norm).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        # Like megatron's layers: the default device (CPU, or a `torch.device` context such as "meta") unless the
        # config asks for GPU initialisation.
        device = None if getattr(config, "use_cpu_initialization", True) or not torch.cuda.is_available() else "cuda"
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # finalize_model_grads all-reduces grads of parameters tagged this way over the TP group.
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
