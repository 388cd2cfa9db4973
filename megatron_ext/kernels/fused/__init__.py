"""Fused element-wise ops for the dense parts of the models: RMSNorm, rotary embedding, vocabulary cross entropy.

Without Transformer Engine or apex, megatron-core runs these as chains of separate fp32 PyTorch kernels. Each op
here has a PyTorch reference (``reference.py``), Triton kernels with an autograd op, and a public function
(``ops.py``) that runs the kernels on CUDA tensors; ``backend=`` forces one.
"""

from megatron_ext.kernels.fused.ops import cross_entropy, rms_norm, rotary, runs_triton
from megatron_ext.kernels.fused.reference import cross_entropy_reference, rms_norm_reference, rotary_reference

__all__ = [
    "rms_norm",
    "rotary",
    "cross_entropy",
    "runs_triton",
    "rms_norm_reference",
    "rotary_reference",
    "cross_entropy_reference",
]
