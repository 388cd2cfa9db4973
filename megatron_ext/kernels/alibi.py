"""ALiBi (Press et al.), DRT's position signal in its causal attention: head h adds slope_h * (j - i) <= 0 to the
logit of query i and key j. Kept free of megatron imports: the megatron core attention and the Hugging Face model
both read it."""

from __future__ import annotations

import math

import torch

__all__ = ["alibi_slopes"]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes: 2^(-8i/n) for n a power of two; otherwise those of the nearest lower power of two
    followed by every other slope of the next one. fp32 [num_heads]."""

    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(base)
    if base != num_heads:
        slopes += power_of_two(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)
