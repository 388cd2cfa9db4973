"""Norms that enter megatron-core through the ``LayerNormBuilder`` slots (``norm(config=, hidden_size=, eps=)``).

megatron-core's own fallback without apex or Transformer Engine, ``WrappedTorchNorm``, refuses sequence parallelism.
:class:`RMSNorm` here works with it: its weight is replicated over the tensor-parallel group and tagged
``sequence_parallel`` so that megatron's ``finalize_model_grads`` all-reduces its gradient over that group (each
rank only saw its own slice of the sequence). It runs the fused Triton RMSNorm of ``megatron_ext.kernels.fused`` on
CUDA tensors (``config.fused_kernel_backend``).
"""

from __future__ import annotations

import torch
from torch import nn

from megatron_ext.kernels.fused import rms_norm

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension; usable as megatron's ``input_layernorm``/``q_layernorm``/... builder.

    config: a TransformerConfig (for params_dtype, sequence_parallel and CPU initialisation);
    hidden_size: the normalised width (the head dim when used as a QK-norm).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.backend = getattr(config, "fused_kernel_backend", "auto")
        # Like megatron's layers: the default device (CPU, or a `torch.device` context such as "meta") unless the
        # config asks for GPU initialisation.
        device = None if getattr(config, "use_cpu_initialization", True) or not torch.cuda.is_available() else "cuda"
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        # finalize_model_grads all-reduces grads of parameters tagged this way over the TP group.
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight)

    def normalize(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This norm with another weight tensor: its own weight passed through a TP gradient sum, say."""
        return rms_norm(x, weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
