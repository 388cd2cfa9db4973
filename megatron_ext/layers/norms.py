"""Norms that enter megatron-core through the ``LayerNormBuilder`` slots (``norm(config=, hidden_size=, eps=)``).

megatron-core's own fallback without apex or Transformer Engine, ``WrappedTorchNorm``, refuses sequence parallelism.
:class:`RMSNorm` here works with it: its weight is replicated over the tensor-parallel group and tagged
``sequence_parallel`` so that megatron's ``finalize_model_grads`` all-reduces its gradient over that group (each
rank only saw its own slice of the sequence). It runs the fused Triton RMSNorm of ``megatron_ext.kernels.fused`` on
CUDA tensors (``config.fused_kernel_backend``). :class:`LayerNorm` is the same for Megatron-LM's default
``--normalization LayerNorm``; :func:`norm_builder` picks one of the two from ``config.normalization``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.kernels.fused import rms_norm

__all__ = ["RMSNorm", "LayerNorm", "norm_builder"]


def _norm_parameter(config, hidden_size: int, value: float) -> nn.Parameter:
    # Like megatron's layers: the default device (CPU, or a `torch.device` context such as "meta") unless the
    # config asks for GPU initialisation.
    device = None if getattr(config, "use_cpu_initialization", True) or not torch.cuda.is_available() else "cuda"
    param = nn.Parameter(torch.full((hidden_size,), value, dtype=config.params_dtype, device=device))
    # finalize_model_grads all-reduces grads of parameters tagged this way over the TP group.
    setattr(param, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))
    return param


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
        self.weight = _norm_parameter(config, hidden_size, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.weight)

    def normalize(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """This norm with another weight tensor: its own weight passed through a TP gradient sum, say."""
        return rms_norm(x, weight, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class LayerNorm(nn.Module):
    """LayerNorm (weight and bias) over the last dimension; the builder for ``normalization='LayerNorm'``.

    Same contract as :class:`RMSNorm`: replicated over tensor parallelism, parameters tagged ``sequence_parallel``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = _norm_parameter(config, hidden_size, 1.0)
        self.bias = _norm_parameter(config, hidden_size, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


NORMS = {"RMSNorm": RMSNorm, "LayerNorm": LayerNorm}


def norm_builder(config):
    """The norm class that ``config.normalization`` names (Megatron-LM's ``--normalization``)."""
    name = getattr(config, "normalization", "RMSNorm")
    if name not in NORMS:
        raise ValueError(f"normalization={name!r} is not supported: use one of {sorted(NORMS)}")
    if getattr(config, "layernorm_zero_centered_gamma", False):
        raise ValueError("layernorm_zero_centered_gamma is not supported by megatron_ext's norms: turn it off")
    return NORMS[name]
