"""Public fused element-wise ops: argument checks and the backend choice.

backend: "auto" runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere (on a CPU, even with
the Triton interpreter on: there these kernels would only slow a model down), "triton" forces the kernels (CUDA,
or CPU tensors in the interpreter), "reference" forces PyTorch.
"""

from __future__ import annotations

import torch

from megatron_ext.kernels.fused import reference as ref
from megatron_ext.kernels.utils import SUPPORTED_DTYPES, check_dtype, resolve_backend

__all__ = ["rms_norm", "rotary", "cross_entropy", "runs_triton"]


def runs_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` runs these ops' Triton kernels on ``tensors``: "auto" on CUDA tensors of the kernels'
    dtypes (fp32, fp16, bf16) only, "triton" also in the CPU interpreter (and other dtypes are an error there).
    Modules that choose between these ops and megatron's own code ask this."""
    if resolve_backend(backend, *tensors, auto_in_interpreter=False) != "triton":
        return False
    if backend == "triton":
        for i, t in enumerate(tensors):
            if t.is_floating_point():
                check_dtype(f"input {i}", t)
        return True
    return all(t.dtype in SUPPORTED_DTYPES for t in tensors if t.is_floating_point())


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of x ``[..., D]`` with an optional weight ``[D]``, in fp32, returned in x's dtype.
    Gradients reach x and the weight."""
    if weight is not None and tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight must be [{x.shape[-1]}] (x's last dim), got {tuple(weight.shape)}")
    use_triton = runs_triton(backend, *((x,) if weight is None else (x, weight)))
    if use_triton:
        from megatron_ext.kernels.fused.triton_rms_norm import MAX_WIDTH

        if x.shape[-1] > MAX_WIDTH:
            if backend == "triton":
                raise ValueError(f"rms_norm: the Triton kernel takes rows of at most {MAX_WIDTH} elements, got "
                                 f"{x.shape[-1]}; use backend='reference'")
            use_triton = False
    if not use_triton or x.numel() == 0:
        return ref.rms_norm_reference(x, weight, eps)
    from megatron_ext.kernels.fused.triton_rms_norm import RMSNormFunction

    return RMSNormFunction.apply(x, weight, float(eps))


def rotary(x: torch.Tensor, freqs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """RoPE of x ``[s, b, h, d]`` by the angles ``freqs [s, 1, 1, r]`` (megatron's non-interleaved layout, r <= d
    even); the gradient reaches x (the angles are constants)."""
    s, r = (x.shape[0] if x.dim() else 0), (freqs.shape[-1] if freqs.dim() else 0)
    if x.dim() != 4 or freqs.dim() != 4 or freqs.shape[:3] != (s, 1, 1) or r % 2 or r > x.shape[-1]:
        raise ValueError(f"rotary: x must be [s, b, h, d] and freqs [s, 1, 1, r] with an even r <= d; got "
                         f"{tuple(x.shape)} and {tuple(freqs.shape)}")
    if not runs_triton(backend, x) or x.numel() == 0:
        return ref.rotary_reference(x, freqs)
    from megatron_ext.kernels.fused.triton_rotary import RotaryFunction

    return RotaryFunction.apply(x, freqs.reshape(s, r).float().contiguous())


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, tp_group=None, backend: str = "auto") -> torch.Tensor:
    """Per-token cross entropy (fp32, ``target``'s shape) of ``logits [..., V_local]`` against ``target [...]``.

    With a tensor-parallel ``tp_group`` of more than one rank the logits are this rank's vocabulary slice (rank r
    holds [r * V_local, (r + 1) * V_local)), as megatron's output layer produces them. The gradient reaches the
    logits, in their dtype.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} need target of shape "
                         f"{tuple(logits.shape[:-1])}, got {tuple(target.shape)}")
    if target.dtype.is_floating_point:
        raise TypeError(f"cross_entropy: target must hold integer token ids, got {target.dtype}")
    if not runs_triton(backend, logits):
        return ref.cross_entropy_reference(logits, target, tp_group)
    from megatron_ext.kernels.fused.triton_cross_entropy import CrossEntropyFunction

    return CrossEntropyFunction.apply(logits, target, tp_group)
