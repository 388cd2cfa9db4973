"""Hierarchical Sparse Attention (HSA): retrieval, sparse chunk attention and decode.

``hsa_retrieval``, ``hsa_attention`` and ``hsa_decode`` run the Triton kernels on CUDA tensors (or in the Triton
interpreter) and the PyTorch reference otherwise; ``backend=`` forces one. The references live in ``reference.py``.
"""

from megatron_ext.kernels.hsa.ops import hsa_attention, hsa_decode, hsa_retrieval
from megatron_ext.kernels.hsa.reference import (
    hsa_attention_reference,
    hsa_decode_reference,
    hsa_retrieval_reference,
)

__all__ = [
    "hsa_retrieval",
    "hsa_attention",
    "hsa_decode",
    "hsa_retrieval_reference",
    "hsa_attention_reference",
    "hsa_decode_reference",
]
